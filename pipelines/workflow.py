"""``vistr workflow``: preprocess -> train -> evaluate -> register -> promote, on Ray, cached in MLflow.

Each step is a ``@ray.remote`` task; the next step receives the previous step's result as an
``ObjectRef`` argument, so Ray runs them in order with no scheduler of ours (Ray Workflows is gone
from Ray 2.60 and ``ray.dag``'s ``execute`` is deprecated).

A step's identity is a hash of the config sections it reads and of its inputs' identities
(:func:`plan`): changing ``train.lr`` changes train, evaluate, register and promote, not
preprocess. Before doing any work a step looks for a FINISHED MLflow run tagged with its hash
whose outputs are still there (shards on disk, checkpoint artifacts, the model version); if one
exists the step is *reused*. So a workflow re-run after a failure continues where it stopped, and
a re-run of a finished workflow does nothing but report.

MLflow layout: one parent run per invocation (``vistr.workflow`` tag), one child run per step
that ran (tags ``vistr.step``, ``vistr.step_hash``, outputs as JSON in ``vistr.outputs``); the
parent records for every step whether it ran or was reused, and which run holds it.
``VISTR_WORKFLOW_FAIL_STEP=STEP`` makes that step fail once it has started (for recovery tests).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vistr.config import Config, ConfigError, load_config, parse_overrides

STEPS = ("preprocess", "train", "evaluate", "register", "promote")
FAIL_ENV = "VISTR_WORKFLOW_FAIL_STEP"
STEP_TAG, HASH_TAG, OUTPUTS_TAG, WORKFLOW_TAG = "vistr.step", "vistr.step_hash", "vistr.outputs", "vistr.workflow"
PARENT_TAG = "mlflow.parentRunId"
PROGRESS_EVERY_S = 30.0


class WorkflowError(RuntimeError):
    """A workflow step failed or cannot start; the message names the step and the fix."""


class InjectedFailure(RuntimeError):
    """Raised by the step named in ``VISTR_WORKFLOW_FAIL_STEP``."""


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@dataclass
class Plan:
    """Everything the steps need, computed up front by the driver (picklable for Ray tasks)."""

    cfg: dict[str, Any]
    data: str  # dataset directory (YouTube-VIS layout of cfg.data)
    out: str  # workflow folder: shards/, ray/, evaluation/
    tracking_uri: str
    experiment_id: str
    eval_annotation: str
    eval_set: str  # content hash of the evaluation annotation file
    hashes: dict[str, str]
    fail_step: str | None = None
    parent_run_id: str | None = None

    @property
    def config(self) -> Config:
        from vistr.config import from_dict

        return from_dict(self.cfg, "workflow plan")


def plan(cfg: Config, data: str | Path, out: str | Path, tracking_uri: str | None = None) -> Plan:
    """Step hashes for ``cfg`` on dataset ``data``: a step's hash covers what it reads and its inputs."""
    from pipelines.evaluate import split_rows
    from pipelines.tracking import client_for, get_or_create_experiment, resolve_tracking_uri

    data = Path(data).resolve()
    train_ann, eval_ann = data / cfg.data.train_ann, split_rows(data, "valid", cfg.data)[0]
    if not train_ann.is_file():
        raise WorkflowError(f"{train_ann}: training annotation file not found; check --data and data.train_ann")
    dataset = {"train": _file_digest(train_ann), "valid": _file_digest(eval_ann)}
    d = cfg.to_dict()
    pre = _digest("preprocess", d["data"], d["model"]["num_frames"], dataset)
    trn = _digest("train", d["model"], d["loss"], d["train"], pre)
    from pipelines.registry import eval_set_id

    eval_set = eval_set_id(eval_ann)
    ev = _digest("evaluate", trn, eval_set)
    reg = _digest("register", ev, cfg.tracking.registered_model)
    pro = _digest("promote", reg, cfg.tracking.promotion_margin, eval_set)
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri if tracking_uri is None else tracking_uri)
    experiment = get_or_create_experiment(client_for(uri), cfg.tracking.experiment)
    hashes = dict(zip(STEPS, (pre, trn, ev, reg, pro), strict=True))
    return Plan(d, str(data), str(Path(out).resolve()), uri, experiment, str(eval_ann), eval_set, hashes)


# ---------------------------------------------------------------- cache


def finished_run(client: Any, p: Plan, step: str) -> Any | None:
    """The newest FINISHED run of ``step`` with this plan's hash whose outputs still exist."""
    query = f"tags.`{HASH_TAG}` = '{p.hashes[step]}' and tags.`{STEP_TAG}` = '{step}' and attributes.status = 'FINISHED'"
    for run in client.search_runs([p.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                  max_results=5):  # fmt: skip
        outputs = json.loads(run.data.tags.get(OUTPUTS_TAG, "null") or "null")
        if outputs is not None and OUTPUTS_PRESENT[step](client, p, outputs):
            return run
    return None


def _shards_present(client: Any, p: Plan, outputs: dict[str, Any]) -> bool:
    from pipelines.shards import ShardError, load_manifest

    try:
        load_manifest(outputs["shards"])
    except ShardError:
        return False
    return True


def _artifacts_present(client: Any, p: Plan, outputs: dict[str, Any]) -> bool:
    return bool(client.list_artifacts(outputs["run_id"], outputs["checkpoint_path"]))


def _version_present(client: Any, p: Plan, outputs: dict[str, Any]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_model_version(outputs["model"], outputs["version"])
    except MlflowException:
        return False
    return True


OUTPUTS_PRESENT: dict[str, Callable[[Any, Plan, dict[str, Any]], bool]] = {
    "preprocess": _shards_present,
    "train": _artifacts_present,
    "evaluate": lambda client, p, outputs: "AP" in outputs.get("metrics", {}),
    "register": _version_present,
    "promote": lambda client, p, outputs: "decision" in outputs,
}


# ---------------------------------------------------------------- steps


def _step_tags(p: Plan, step: str) -> dict[str, str]:
    return {STEP_TAG: step, HASH_TAG: p.hashes[step], PARENT_TAG: p.parent_run_id or ""}


def _maybe_fail(p: Plan, step: str) -> None:
    if p.fail_step == step:
        raise InjectedFailure(f"{FAIL_ENV}={step}: injected failure in step {step}")


def _preprocess(p: Plan, client: Any, run_id: str, inputs: list[dict]) -> dict[str, Any]:
    from pipelines.preprocess import run_preprocess

    shards = Path(p.out) / "shards" / p.hashes["preprocess"]
    _maybe_fail(p, "preprocess")
    manifest = run_preprocess(p.config, p.data, shards, shard_mb=8.0)
    return {"shards": str(shards), "clips": manifest.get("counts", {})}


def _train(p: Plan, client: Any, inputs: list[dict]) -> dict[str, Any]:
    """Train creates its own (child) run; a half-done run of the same hash is resumed, not redone."""
    from pipelines.train import train
    from vistr import storage as fsio

    storage, name = str(Path(p.out) / "ray"), f"train-{p.hashes['train']}"
    resume = name if fsio.exists(f"{storage}/{name}") else None
    _maybe_fail(p, "train")
    outcome = train(p.config, inputs[0]["shards"], name=None if resume else name, resume=resume,
                    storage=storage, run_tags=_step_tags(p, "train"))  # fmt: skip
    folder = "checkpoints/best" if outcome.best_checkpoint else "checkpoints/final"
    if outcome.checkpoint is None:
        raise WorkflowError(f"training run {name} ended without a checkpoint; raise train.max_minutes or epochs")
    return {"run_id": outcome.run_id, "checkpoint_path": folder, "metrics": _numbers(outcome.metrics)}


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _evaluate(p: Plan, client: Any, run_id: str, inputs: list[dict]) -> dict[str, Any]:
    from pipelines.evaluate import evaluate_model

    trained = inputs[0]
    _maybe_fail(p, "evaluate")
    uri = f"runs:/{trained['run_id']}/{trained['checkpoint_path']}"
    metrics = evaluate_model(uri, p.data, "valid", out=Path(p.out) / "evaluation" / p.hashes["evaluate"],
                             mlflow_run=run_id, tracking_uri=p.tracking_uri)  # fmt: skip
    return {"model_uri": uri, "metrics": metrics, "eval_set": p.eval_set, "train_run_id": trained["run_id"]}


def _register(p: Plan, client: Any, run_id: str, inputs: list[dict]) -> dict[str, Any]:
    from pipelines.registry import register_run

    evaluated = inputs[0]
    _maybe_fail(p, "register")
    name = p.config.tracking.registered_model
    version = register_run(evaluated["train_run_id"], name=name, tracking_uri=p.tracking_uri, into_run_id=run_id,
                           metrics=evaluated["metrics"], eval_set=evaluated["eval_set"])  # fmt: skip
    return {"model": name, "version": str(version.version)}


def _promote(p: Plan, client: Any, run_id: str, inputs: list[dict]) -> dict[str, Any]:
    from dataclasses import asdict

    from pipelines.registry import CHALLENGER, CHAMPION, evaluate_on, promote

    registered = inputs[0]
    _maybe_fail(p, "promote")
    name, version = registered["model"], registered["version"]
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    if champion is not None and str(champion) == version:
        return {"decision": {"promoted": True, "reason": "already the champion", "challenger": version}}
    client.set_registered_model_alias(name, CHALLENGER, version)  # this workflow's candidate
    decision = promote(client, name, p.eval_set, evaluate_on(p.data, "valid", p.tracking_uri,
                       Path(p.out) / "promotion"), p.config.tracking.promotion_margin)  # fmt: skip
    return {"decision": asdict(decision)}


STEP_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "preprocess": _preprocess, "evaluate": _evaluate, "register": _register, "promote": _promote,
}  # fmt: skip


def run_step(step: str, p: Plan, *inputs: dict[str, Any]) -> dict[str, Any]:
    """One step: reuse a finished run with the same hash, or run it as a child of the workflow run."""
    from pipelines.tracking import client_for, set_tags

    client = client_for(p.tracking_uri)
    started = time.monotonic()
    cached = finished_run(client, p, step)
    if cached is not None:
        outputs = json.loads(cached.data.tags[OUTPUTS_TAG])
        return {**outputs, "run_id": cached.info.run_id, "state": "reused", "seconds": time.monotonic() - started}
    if step == "train":
        outputs = _train(p, client, list(inputs))
        run_id = outputs["run_id"]
    else:
        run_id = client.create_run(p.experiment_id, run_name=step, tags=_step_tags(p, step)).info.run_id
        try:
            outputs = STEP_FUNCTIONS[step](p, client, run_id, list(inputs))
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
    set_tags(client, run_id, {OUTPUTS_TAG: json.dumps({**outputs, "run_id": run_id})})
    if step != "train":
        client.set_terminated(run_id, "FINISHED")
    return {**outputs, "run_id": run_id, "state": "ran", "seconds": time.monotonic() - started}


# ---------------------------------------------------------------- driver


def training_progress(client: Any, p: Plan) -> str:
    """One line on the running train step, read from its MLflow run (the workers log there)."""
    query = f"tags.`{HASH_TAG}` = '{p.hashes['train']}' and attributes.status = 'RUNNING'"
    runs = client.search_runs([p.experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    metrics = runs[0].data.metrics if runs else {}
    if "train/loss" not in metrics:
        return "training: starting Ray Train workers ..."
    line = f"training: loss {metrics['train/loss']:.3f}"
    if "epoch" in metrics:
        line += f", {int(metrics['epoch']) + 1} epoch(s) done (step {int(metrics.get('global_step', 0))})"
    return line + (f", val AP {metrics['val_AP']:.3f}" if "val_AP" in metrics else "")


def run_workflow(cfg: Config, data: str | Path, out: str | Path, *, address: str | None = None,
                 workers: int | None = None, config_name: str = "config",
                 progress: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Run (or resume, or just report) the whole DAG; returns each step's outputs."""
    import ray

    from pipelines.ray_runtime import connect
    from pipelines.tracking import client_for, config_params, log_params, set_tags

    if workers is not None:  # part of the train step's identity: it changes the effective batch
        cfg = cfg.with_overrides({"train.num_workers": workers}, "--num-workers")
    p = plan(cfg, data, out)
    p.fail_step = os.environ.get(FAIL_ENV) or None
    if p.fail_step is not None and p.fail_step not in STEPS:
        raise WorkflowError(f"{FAIL_ENV}={p.fail_step}: not a step ({', '.join(STEPS)})")
    client = client_for(p.tracking_uri)
    parent = client.create_run(p.experiment_id, run_name=f"workflow-{config_name}",
                               tags={WORKFLOW_TAG: p.hashes["promote"], "vistr.config": config_name})  # fmt: skip
    p.parent_run_id = parent.info.run_id
    log_params(client, p.parent_run_id, config_params(cfg))
    set_tags(client, p.parent_run_id, {f"vistr.hash.{s}": h for s, h in p.hashes.items()})
    started = connect(address)
    results: dict[str, dict[str, Any]] = {}
    try:
        step_task = ray.remote(num_cpus=0, max_retries=0)(run_step)
        refs: dict[str, Any] = {}
        previous = None
        for step in STEPS:  # each step takes the previous one's result: Ray orders them
            refs[step] = step_task.remote(step, p, *([] if previous is None else [previous]))
            previous = refs[step]
        for number, step in enumerate(STEPS, 1):
            progress(f"[{number}/{len(STEPS)}] {step} ({p.hashes[step]}) ...")
            try:
                while not ray.wait([refs[step]], timeout=PROGRESS_EVERY_S)[0]:
                    if step == "train":
                        progress(f"      {training_progress(client, p)}")
                results[step] = ray.get(refs[step])
            except ray.exceptions.RayTaskError as exc:
                set_tags(client, p.parent_run_id, {f"step.{step}": "failed"})
                for later in STEPS[number:]:  # they fail at once on the missing input: collect them quietly
                    with contextlib.suppress(ray.exceptions.RayError):
                        ray.get(refs[later])
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise WorkflowError(f"step {step} failed: {type(cause).__name__}: {cause}. Fix it and re-run "
                                    "`vistr workflow` with the same config: finished steps are reused") from exc  # fmt: skip
            r = results[step]
            set_tags(client, p.parent_run_id, {f"step.{step}": f"{r['state']} {r['run_id']}"})
            progress(f"      {r['state']} (run {r['run_id']}, {r['seconds']:.0f}s)")
        client.set_terminated(p.parent_run_id, "FINISHED")
        return results
    except BaseException:
        client.set_terminated(p.parent_run_id, "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()


def status(cfg: Config, data: str | Path, out: str | Path) -> list[dict[str, str]]:
    """Per step: done (a finished run with this hash and its outputs exist) or pending, plus how the
    latest workflow run of this config got it (ran / reused / failed)."""
    from pipelines.tracking import client_for

    p = plan(cfg, data, out)
    client = client_for(p.tracking_uri)
    latest = client.search_runs([p.experiment_id], filter_string=f"tags.`{WORKFLOW_TAG}` = '{p.hashes['promote']}'",
                                order_by=["attributes.start_time DESC"], max_results=1)  # fmt: skip
    last_tags = latest[0].data.tags if latest else {}
    rows = []
    for step in STEPS:
        run = finished_run(client, p, step)
        last = last_tags.get(f"step.{step}", "-").split(" ")[0]
        rows.append({"step": step, "hash": p.hashes[step], "state": "done" if run else "pending",
                     "run_id": run.info.run_id if run else "-", "last_workflow": last})  # fmt: skip
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config YAML or preset name")
    parser.add_argument("--data", help="dataset directory (default: the config's data.root)")
    parser.add_argument("--out", type=Path, help="workflow folder for shards/runs (default runs/workflow/<config>)")
    parser.add_argument("--status", action="store_true", help="show which steps are done or pending; run nothing")
    parser.add_argument("--num-workers", type=int, help="Ray Train workers (default: train.num_workers)")
    parser.add_argument("--address", help="Ray cluster: 'auto', host:port (default: a local one)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set train.lr=3e-4 (repeatable; YAML values)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides=parse_overrides(args.overrides))
        data = args.data or cfg.data.root
        if not data:
            raise WorkflowError("no dataset: pass --data DIR or set data.root in the config")
        name = Path(args.config).stem
        out = args.out or Path("runs") / "workflow" / name
        if args.status:
            rows = status(cfg, data, out)
            print(f"{'step':<11} {'hash':<17} {'state':<8} {'last run':<9} run id")
            for r in rows:
                print(f"{r['step']:<11} {r['hash']:<17} {r['state']:<8} {r['last_workflow']:<9} {r['run_id']}")
            return 0
        results = run_workflow(cfg, data, out, address=args.address, workers=args.num_workers, config_name=name)
    except (WorkflowError, ConfigError, ValueError, OSError) as exc:
        print(f"vistr workflow: error: {exc}", file=sys.stderr)
        return 1
    evaluated, decision = results["evaluate"]["metrics"], results["promote"]["decision"]
    print(f"AP {evaluated['AP']:.4f}  AP50 {evaluated['AP50']:.4f}; "
          f"{results['register']['model']} v{results['register']['version']}: "
          f"{'champion' if decision['promoted'] else 'refused'} ({decision['reason']})")  # fmt: skip
    return 0
