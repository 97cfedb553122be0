"""The MLflow model registry: register trained runs, promote by evaluation, roll back.

A registered version is an MLflow **pyfunc** model whose artifacts are a weights-only vistr
checkpoint (``artifacts/checkpoint.pt``, config inside) and its ``config.yaml``:

- ``mlflow.pyfunc.load_model("models:/vistr@champion").predict(frames)`` segments one clip
  (uint8 RGB frames ``[L, H, W, 3]``, L <= T) into one row per instance sequence;
- ``vistr predict --model models:/vistr@champion`` downloads the same folder and rebuilds the full
  torch model from ``checkpoint.pt`` (``pipelines.model_source``).

The model records its input/output signature, pip requirements and the ``vistr``/``pipelines``
code it needs (``code_paths``), the training run it came from, and its evaluation metrics.

Promotion uses MLflow 3 aliases (never stages): ``register`` points ``challenger`` at the new
version; ``promote`` scores challenger and champion on the **same** evaluation set (identified by
a content hash of its annotation file) and moves ``champion`` only if the challenger's AP is at
least the champion's AP + margin; the replaced champion keeps ``previous`` for ``rollback``.
Every decision is written as ``promotion.*`` tags on the challenger's version, and each version
caches its scores per evaluation set as ``eval.<set>.<stat>`` tags so nothing is scored twice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.model_source import CHECKPOINT_FILE

DEFAULT_NAME = "vistr"
CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
RUN_CHECKPOINTS = ("checkpoints/best", "checkpoints/final")  # what `vistr train` logs, preferred first
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class RegistryError(RuntimeError):
    """A registry operation cannot proceed; the message says why and what to do."""


# ---------------------------------------------------------------- helpers


def eval_set_id(annotation: str | Path) -> str:
    """Identity of an evaluation set: the content hash of its annotation file (paths may differ)."""
    return hashlib.sha256(Path(annotation).read_bytes()).hexdigest()[:12]


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def cached_eval(version: Any, set_id: str) -> dict[str, float] | None:
    """The version's scores on evaluation set ``set_id`` if it was evaluated there before."""
    prefix = f"eval.{set_id}."
    stats = {k[len(prefix) :]: float(v) for k, v in version.tags.items() if k.startswith(prefix)}
    return stats if "AP" in stats else None


def record_eval(client: Any, name: str, version: str, set_id: str, metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"eval.{set_id}.{key}", f"{float(value):.6f}")


def _run_checkpoint(run_id: str, tracking_uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    errors = []
    for folder in RUN_CHECKPOINTS:
        try:
            return Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{folder}/{CHECKPOINT_FILE}", dst_path=str(dst),
                tracking_uri=tracking_uri,
            ))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            errors.append(f"{folder}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    raise RegistryError(
        f"run {run_id} has no checkpoint artifact ({'; '.join(errors)}); register a run made by "
        "`vistr train`, which logs checkpoints/best and checkpoints/final"
    )


# ---------------------------------------------------------------- register


def register_run(
    train_run_id: str,
    *,
    name: str = DEFAULT_NAME,
    tracking_uri: str | None = None,
    into_run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    eval_set: str | None = None,
) -> Any:
    """Log the training run's best (else final) checkpoint as a pyfunc model, register it under
    ``name`` and point ``challenger`` at the new version; returns the ``ModelVersion``.

    The model is logged into ``into_run_id`` (a workflow's register step) or the training run
    itself. ``metrics`` measured on ``eval_set`` are cached on the version for ``promote``.
    """
    import mlflow
    import mlflow.pyfunc

    from pipelines.pyfunc_model import VistrPyfunc, requirements, signature
    from pipelines.tracking import client_for, resolve_tracking_uri
    from vistr.checkpoint import model_from_checkpoint, save_checkpoint
    from vistr.config import save_config

    tracking_uri = resolve_tracking_uri(tracking_uri)
    client = client_for(tracking_uri)
    run = client.get_run(train_run_id)
    with tempfile.TemporaryDirectory() as folder:
        source = _run_checkpoint(train_run_id, tracking_uri, Path(folder) / "download")
        model, cfg = model_from_checkpoint(source)
        # Weights only: the optimizer state of a training checkpoint is 2x the model and useless here.
        slim = save_checkpoint(Path(folder) / CHECKPOINT_FILE, model, config=cfg)
        config_file = save_config(cfg, Path(folder) / "config.yaml")
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=into_run_id or train_run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=VistrPyfunc(),
                artifacts={"checkpoint": str(slim), "config": str(config_file)},
                code_paths=[str(PROJECT_ROOT / "vistr"), str(PROJECT_ROOT / "pipelines")],
                signature=signature(),
                pip_requirements=requirements(),
                metadata={"train_run_id": train_run_id, "config_hash": cfg.hash(),
                          "metrics": dict(metrics or {}), "eval_set": eval_set},
                registered_model_name=name,
            )  # fmt: skip
    version = str(info.registered_model_version)
    tags = {"source_train_run": train_run_id, "source_run_name": run.info.run_name or "",
            "config_hash": cfg.hash(), "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if metrics and eval_set:
        record_eval(client, name, version, eval_set, metrics)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return client.get_model_version(name, version)


# ---------------------------------------------------------------- promote / rollback


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger: str | None  # version numbers as strings
    champion_before: str | None
    challenger_ap: float | None
    champion_ap: float | None
    margin: float
    eval_set: str
    dry_run: bool


def decide(challenger_ap: float, champion_ap: float | None, margin: float) -> tuple[bool, str]:
    """The gate: no champion -> promote; else promote iff challenger AP >= champion AP + margin."""
    if champion_ap is None:
        return True, "no champion yet"
    if challenger_ap >= champion_ap + margin:
        return True, f"AP {challenger_ap:.4f} >= champion AP {champion_ap:.4f} + margin {margin:g}"
    return False, f"AP {challenger_ap:.4f} < champion AP {champion_ap:.4f} + margin {margin:g}"


def promote(
    client: Any,
    name: str,
    eval_set: str,
    evaluate_version: Callable[[Any], dict[str, float]],
    margin: float = 0.0,
    dry_run: bool = False,
) -> Decision:
    """Score ``challenger`` and ``champion`` on ``eval_set`` (cached per version), move the aliases
    if the gate passes, and tag the challenger's version with the decision.

    ``evaluate_version(model_version) -> metrics`` scores a version on the evaluation set named
    ``eval_set``; it is only called for a version without cached scores on that set.
    """
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise RegistryError(f"model {name!r} has no {CHALLENGER!r} version: `vistr register RUN_ID` first")
    champion = _alias_version(client, name, CHAMPION)
    if champion is not None and str(champion.version) == str(challenger.version):
        raise RegistryError(f"{name} version {challenger.version} is already the champion")

    def score(version: Any) -> float:
        stats = cached_eval(version, eval_set)
        if stats is None:
            stats = evaluate_version(version)
            record_eval(client, name, str(version.version), eval_set, stats)
        return float(stats["AP"])

    challenger_ap = score(challenger)
    champion_ap = score(champion) if champion is not None else None
    promoted, reason = decide(challenger_ap, champion_ap, margin)
    decision = Decision(promoted, reason, str(challenger.version), None if champion is None else str(champion.version),
                        challenger_ap, champion_ap, margin, eval_set, dry_run)  # fmt: skip
    if dry_run:
        return decision
    version = str(challenger.version)
    tags = {
        "promotion.decision": "promoted" if promoted else "refused", "promotion.reason": reason,
        "promotion.challenger_AP": f"{challenger_ap:.6f}",
        "promotion.champion_AP": "none" if champion_ap is None else f"{champion_ap:.6f}",
        "promotion.champion_version": decision.champion_before or "none",
        "promotion.margin": f"{margin:g}", "promotion.eval_set": eval_set,
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
        client.set_registered_model_alias(name, CHAMPION, version)
    client.delete_registered_model_alias(name, CHALLENGER)  # decided either way
    return decision


def rollback(client: Any, name: str) -> tuple[str, str]:
    """Give ``champion`` back to the ``previous`` version; returns (old champion, new champion).

    ``previous`` then moves to the version the restored champion had replaced, if any.
    """
    champion, previous = _alias_version(client, name, CHAMPION), _alias_version(client, name, PREVIOUS)
    if champion is None or previous is None:
        raise RegistryError(f"model {name!r} needs both a {CHAMPION!r} and a {PREVIOUS!r} version to roll back")
    old, new = str(champion.version), str(previous.version)
    client.set_registered_model_alias(name, CHAMPION, new)
    client.set_model_version_tag(name, old, "rollback", f"replaced by version {new} at {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    before = previous.tags.get("promotion.champion_version", "none")
    if before not in ("none", new):
        client.set_registered_model_alias(name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    return old, new


def evaluate_on(data_dir: str | Path, split: str, tracking_uri: str, out: Path,
                address: str | None = None) -> Callable[[Any], dict[str, float]]:  # fmt: skip
    """An ``evaluate_version`` for :func:`promote`: Ray Data evaluation of ``models:/NAME/VERSION``."""
    from pipelines.evaluate import evaluate_model

    def run(version: Any) -> dict[str, float]:
        uri = f"models:/{version.name}/{version.version}"
        return evaluate_model(uri, data_dir, split, out=out / f"v{version.version}", address=address,
                              tracking_uri=tracking_uri)  # fmt: skip

    return run


def split_annotation(data_dir: str | Path, split: str, model_name: str, client: Any) -> Path:
    """The annotation file of ``split`` under ``data_dir``, laid out as the candidate's config says."""
    import mlflow
    import yaml

    from pipelines.evaluate import split_rows
    from vistr.config import DataConfig, from_dict

    candidate = _alias_version(client, model_name, CHALLENGER) or _alias_version(client, model_name, CHAMPION)
    data_cfg = DataConfig()
    if candidate is not None:
        mlflow.set_tracking_uri(client.tracking_uri)  # the registry follows it
        with tempfile.TemporaryDirectory() as folder:
            path = mlflow.artifacts.download_artifacts(
                f"models:/{model_name}/{candidate.version}/artifacts/config.yaml", dst_path=folder
            )
            data_cfg = from_dict(yaml.safe_load(Path(path).read_text()), path).data
    return split_rows(data_dir, split, data_cfg)[0]


# ---------------------------------------------------------------- CLI: register / promote / models


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="name", default=DEFAULT_NAME, help=f"registered model name (default {DEFAULT_NAME})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)")


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a `vistr train` run")
    _common(parser)


def run_register(args: argparse.Namespace) -> int:
    try:
        version = register_run(args.run_id, name=args.name, tracking_uri=args.tracking_uri)
    except (RegistryError, ValueError, OSError) as exc:
        print(f"vistr register: error: {exc}", file=sys.stderr)
        return 1
    print(f"registered {args.name} version {version.version} (alias {CHALLENGER}); next: vistr promote --data DATASET")
    return 0


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--data", required=True, help="evaluation dataset directory (YouTube-VIS layout)")
    parser.add_argument("--split", default="valid", help="evaluation split (default valid)")
    parser.add_argument("--margin", type=float, default=0.0, help="AP the challenger must add over the champion")
    parser.add_argument("--dry-run", action="store_true", help="evaluate and print the decision; change nothing")
    parser.add_argument("--out", type=Path, default=Path("runs") / "promotion", help="evaluation outputs folder")
    parser.add_argument("--address", help="Ray cluster for the evaluation (default: a local one)")


def run_promote(args: argparse.Namespace) -> int:
    from pipelines.tracking import client_for, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    client = client_for(uri)
    try:
        annotation = split_annotation(args.data, args.split, args.name, client)
        decision = promote(client, args.name, eval_set_id(annotation),
                           evaluate_on(args.data, args.split, uri, args.out, args.address), args.margin, args.dry_run)  # fmt: skip
    except (RegistryError, ValueError, OSError) as exc:
        print(f"vistr promote: error: {exc}", file=sys.stderr)
        return 1
    verb = "would promote" if decision.dry_run and decision.promoted else "promoted" if decision.promoted else "refused"
    print(f"{verb} {args.name} version {decision.challenger}: {decision.reason}")
    print(json.dumps(asdict(decision)))
    return 0


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "show", "rollback"], help="list versions, show one, roll back")
    parser.add_argument("version", nargs="?", help="for show: a version number or an alias (default champion)")
    _common(parser)


def _aliases(client: Any, name: str) -> dict[str, list[str]]:
    by_version: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def run_models(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import client_for

    client = client_for(args.tracking_uri)
    try:
        if args.action == "rollback":
            old, new = rollback(client, args.name)
            print(f"{args.name}: champion version {old} -> {new}")
            return 0
        aliases = _aliases(client, args.name)
        if args.action == "list":
            versions = sorted(client.search_model_versions(f"name='{args.name}'"), key=lambda v: int(v.version))
            print(f"{'version':>7}  {'aliases':<28} {'decision':<9} {'AP':>8}  source run")
            for v in versions:
                ap = v.tags.get("promotion.challenger_AP", "-")
                print(f"{v.version:>7}  {','.join(sorted(aliases.get(str(v.version), []))) or '-':<28} "
                      f"{v.tags.get('promotion.decision', '-'):<9} {ap:>8}  {v.tags.get('source_train_run', v.run_id)}")
            return 0
        spec = args.version or CHAMPION
        version = client.get_model_version(args.name, spec) if spec.isdigit() else client.get_model_version_by_alias(args.name, spec)
        print(json.dumps({"name": args.name, "version": version.version, "aliases": aliases.get(str(version.version), []),
                          "run_id": version.run_id, "source": version.source, "tags": dict(sorted(version.tags.items()))},
                         indent=1))  # fmt: skip
        return 0
    except (RegistryError, MlflowException) as exc:
        print(f"vistr models {args.action}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
