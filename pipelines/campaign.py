"""Campaign files (``vistr tune CAMPAIGN.yaml``): parsed and checked before any trial runs.

A campaign names a base config (preset or path) and overrides, a search space over dotted
config keys, the metric and mode, the scheduler (ASHA or FIFO), the number of samples, the
resources of each trial and the data; ``scales.NAME`` sections (``--scale NAME``) restate any of
these for another scale (configs/ablations/: paper scale by default, ``--scale cpu`` for CPU).
:func:`load_campaign` refuses, naming the file, the key and the fix: unknown keys, bad
distributions, values the config refuses (every finite combination is tried), a metric training
never reports. No Ray or MLflow here: running the campaign is ``pipelines.tune``.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vistr.config import Config, ConfigError, load_config, unknown_key_message
from vistr.data.shard_settings import preprocess_settings, settings_hash

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORAGE = PROJECT_ROOT / "runs" / "campaigns"
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")
CAMPAIGN_KEYS = {"name", "description", "base", "overrides", "search_space", "metric", "mode", "scheduler",
                 "num_samples", "max_concurrent_trials", "resources", "data", "storage", "labels", "scales"}  # fmt: skip
RESOURCE_KEYS = {"trial_cpus": None, "num_workers": "train.num_workers", "cpus_per_worker": "train.cpus_per_worker",
                 "gpus_per_worker": "train.gpus_per_worker"}  # fmt: skip
SCHEDULER_KEYS = {"type", "grace_period", "max_t", "reduction_factor"}
DATA_KEYS = {"src", "synthetic", "shards", "shard_mb"}
MAX_CHECKED_COMBINATIONS = 512


class CampaignError(ValueError):
    """The campaign file is invalid or cannot run; the message names the file, the key and the fix."""


@dataclass
class Campaign:
    """A validated campaign: every path absolute, every default filled in (JSON-able but ``config``)."""

    name: str
    source: str
    base: str
    overrides: dict[str, Any]
    search_space: dict[str, dict[str, Any]]
    metric: str
    mode: str
    scheduler: dict[str, Any]
    num_samples: int
    max_concurrent_trials: int
    trial_cpus: float
    data: dict[str, Any]
    storage: str
    labels: dict[str, dict[str, str]] = field(default_factory=dict)
    config: Config = field(default=None, repr=False)  # base + overrides + resources, validated

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("config", "source")}

    @property
    def experiment_dir(self) -> str:
        return f"{self.storage}/{self.name}"


def value_text(value: Any) -> str:
    """How a search-space value is shown and looked up in ``labels`` (``false``, ``video``, ``0.1``)."""
    return value if isinstance(value, str) else json.dumps(value)


def allowed_metrics(cfg: Config) -> set[str]:
    """What every epoch report of ``pipelines.train`` carries (``val_*`` only when validating)."""
    from vistr.evaluation import STAT_NAMES
    from vistr.losses import build_criterion

    losses = {f"epoch/{k}" for k in build_criterion(cfg).weight_dict} | {"epoch/loss", "epoch/class_error"}
    return losses | {"samples_per_s", "data_wait_fraction"} | {f"val_{s}" for s in STAT_NAMES}


def _apply(cfg: Config, overrides: dict[str, Any], where: str) -> Config:
    try:
        return cfg.with_overrides(overrides, where)
    except ConfigError as exc:
        raise CampaignError(str(exc)) from exc


def _values(key: str, spec: Any, cfg: Config, where: str) -> list[Any] | None:
    """Check one search-space entry; its values if finite (choice/grid), else None."""
    if key not in cfg.flat():
        raise CampaignError(f"{where}: {unknown_key_message(key, cfg.flat())}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise CampaignError(
            f"{where}.{key}: expected one of {{{': ..., '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise CampaignError(f"{where}.{key}.{kind}: expected a non-empty list of values, got {args!r}")
        for value in args:
            _apply(cfg, {key: value}, f"{where}.{key}")
        return list(args)
    numbers = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)  # fmt: skip
    if not numbers or args[0] >= args[1]:
        raise CampaignError(f"{where}.{key}.{kind}: expected [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise CampaignError(f"{where}.{key}.loguniform: the lower bound must be > 0, got {args[0]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise CampaignError(f"{where}.{key}.randint: bounds must be integers (high exclusive), got {args!r}")
    ends = [args[0], args[1] - 1] if kind == "randint" else [float(args[0]), float(args[1])]
    settings = {settings_hash(preprocess_settings(_apply(cfg, {key: v}, f"{where}.{key}"))) for v in ends}
    if len(settings) > 1 or settings != {settings_hash(preprocess_settings(cfg))}:
        raise CampaignError(
            f"{where}.{key}: changes the preprocessed shards, so it needs a choice or grid (shards are built "
            "per value before the trials start)"
        )
    return None


def _section(data: dict[str, Any], key: str, allowed: set[str], source: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise CampaignError(f"{source}: {key} must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise CampaignError(f"{source}: unknown key(s) {', '.join(f'{key}.{k}' for k in unknown)}; "
                            f"valid: {', '.join(sorted(allowed))}")  # fmt: skip
    return value


def _scheduler(raw: Any, cfg: Config, source: str) -> dict[str, Any]:
    if raw is None:
        raw = {"type": cfg.tune.scheduler}
    raw = (
        {"type": raw}
        if isinstance(raw, str)
        else _section({"scheduler": raw}, "scheduler", SCHEDULER_KEYS, source)
    )
    kind = raw.get("type", "fifo")
    if kind == "fifo":
        if set(raw) - {"type"}:
            raise CampaignError(
                f"{source}: scheduler fifo takes no options, got {sorted(set(raw) - {'type'})}"
            )
        return {"type": "fifo"}
    if kind != "asha":
        raise CampaignError(f"{source}: scheduler.type={kind!r}; expected asha or fifo")
    out = {"type": "asha", "grace_period": raw.get("grace_period", cfg.tune.grace_period),
           "max_t": raw.get("max_t", cfg.train.epochs), "reduction_factor": raw.get("reduction_factor", 2)}  # fmt: skip
    if not all(isinstance(out[k], int) and not isinstance(out[k], bool) for k in ("grace_period", "max_t")):
        raise CampaignError(f"{source}: scheduler.grace_period and scheduler.max_t must be integers (epochs)")
    factor = out["reduction_factor"]
    if (
        not 1 <= out["grace_period"] <= out["max_t"]
        or isinstance(factor, bool)
        or not isinstance(factor, (int, float))
        or factor <= 1
    ):
        raise CampaignError(
            f"{source}: scheduler needs 1 <= grace_period <= max_t and reduction_factor > 1, got {out}"
        )
    return out


def _data(raw: dict[str, Any], cfg: Config, storage: str, source: str) -> dict[str, Any]:
    if "src" in raw and "synthetic" in raw:
        raise CampaignError(f"{source}: data.src and data.synthetic exclude each other; keep one")
    out: dict[str, Any] = {"shards": str(Path(raw.get("shards") or f"{storage}/shards").resolve()),
                           "shard_mb": float(raw.get("shard_mb", 64.0))}  # fmt: skip
    if "synthetic" in raw:
        from vistr.data.synthetic import SynthSpec

        spec = raw["synthetic"] or {}
        try:
            SynthSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        except TypeError as exc:
            raise CampaignError(
                f"{source}: data.synthetic: {exc} (fields: see vistr.data.synthetic.SynthSpec)"
            ) from exc
        out["synthetic"] = spec
        return out
    src = raw.get("src") or cfg.data.root
    if not src:
        raise CampaignError(
            f"{source}: no dataset: set data.src (or data.synthetic) in the campaign, or --set data.root=DIR"
        )
    if not Path(src).is_dir():
        raise CampaignError(f"{source}: data.src {src} is not a directory (a YouTube-VIS-layout dataset)")
    out["src"] = str(Path(src).resolve())
    return out


def load_campaign(path: str | Path, scale: str | None = None, sets: dict[str, Any] | None = None,
                  storage: str | None = None) -> Campaign:  # fmt: skip
    """Parse and validate a campaign file; ``scale`` applies ``scales.<scale>`` (its ``overrides``
    are merged over the file's, every other key replaces); ``sets`` are extra config overrides."""
    path = Path(path)
    source = str(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CampaignError(f"{source}: cannot read the campaign: {exc}") from exc
    if not isinstance(raw, dict):
        raise CampaignError(f"{source}: a campaign is a mapping of keys ({', '.join(sorted(CAMPAIGN_KEYS))})")
    unknown = sorted(set(raw) - CAMPAIGN_KEYS)
    if unknown:
        raise CampaignError(
            f"{source}: unknown campaign key(s) {', '.join(unknown)}; valid: {', '.join(sorted(CAMPAIGN_KEYS))}"
        )
    name = raw.get("name") or path.stem
    if scale is not None:
        scales = raw.get("scales") or {}
        if scale not in scales:
            raise CampaignError(
                f"{source}: --scale {scale}: no scales.{scale} (scales: {', '.join(scales) or 'none'})"
            )
        extra = scales[scale] or {}
        bad = sorted(set(extra) - (CAMPAIGN_KEYS - {"name", "scales"}))
        if bad:
            raise CampaignError(f"{source}: scales.{scale}: key(s) {', '.join(bad)} cannot be set per scale")
        raw = {
            **raw,
            **extra,
            "overrides": {**(raw.get("overrides") or {}), **(extra.get("overrides") or {})},
        }
        name = f"{name}-{scale}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise CampaignError(
            f"{source}: name {name!r}: use letters, digits, '-', '_', '.' (it names folders and runs)"
        )
    base = str(raw.get("base") or "")
    if not base:
        raise CampaignError(f"{source}: base: name a preset (paper_r50, tiny_cpu, ...) or a config YAML")
    base_path = Path(base) if Path(base).is_absolute() else path.parent / base
    try:
        cfg = load_config(base_path if base_path.is_file() else base)
    except ConfigError as exc:
        raise CampaignError(f"{source}: base: {exc}") from exc
    overrides = {**(raw.get("overrides") or {}), **(sets or {})}
    cfg = _apply(cfg, overrides, f"{source}: overrides")
    resources = _section(raw, "resources", set(RESOURCE_KEYS), source)
    clash = sorted(RESOURCE_KEYS[k] for k in resources if RESOURCE_KEYS[k] in overrides)
    if clash:
        raise CampaignError(f"{source}: {', '.join(clash)} set both in overrides and in resources; keep one")
    cfg = _apply(
        cfg, {RESOURCE_KEYS[k]: v for k, v in resources.items() if RESOURCE_KEYS[k]}, f"{source}: resources"
    )
    trial_cpus = float(resources.get("trial_cpus", 1.0))
    if trial_cpus <= 0:
        raise CampaignError(
            f"{source}: resources.trial_cpus must be > 0 (Ray Tune refuses 0), got {trial_cpus}"
        )

    space = raw.get("search_space") or {}
    if not isinstance(space, dict) or not space:
        raise CampaignError(f"{source}: search_space: give at least one config key with a distribution")
    finite = {key: _values(key, spec, cfg, f"{source}: search_space") for key, spec in space.items()}
    finite = {k: v for k, v in finite.items() if v is not None}
    for combo in itertools.islice(itertools.product(*finite.values()), MAX_CHECKED_COMBINATIONS):
        _apply(cfg, dict(zip(finite, combo, strict=True)), f"{source}: search_space combination")

    metric = raw.get("metric", cfg.tune.metric)
    if metric not in allowed_metrics(cfg):
        raise CampaignError(f"{source}: metric {metric!r} is not reported by training; one of "
                            f"{', '.join(sorted(allowed_metrics(cfg)))}")  # fmt: skip
    if metric.startswith("val_") and cfg.train.validate_every != 1:
        raise CampaignError(f"{source}: metric {metric} needs train.validate_every: 1 (Tune reads the metric from every "
                            f"epoch's report), got {cfg.train.validate_every}")  # fmt: skip
    mode = raw.get("mode", cfg.tune.mode)
    if mode not in ("max", "min"):
        raise CampaignError(f"{source}: mode={mode!r}; expected max or min")
    counts = {"num_samples": raw.get("num_samples", cfg.tune.num_samples),
              "max_concurrent_trials": raw.get("max_concurrent_trials", cfg.tune.max_concurrent_trials)}  # fmt: skip
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CampaignError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict) or not set(labels) <= set(space):
        raise CampaignError(
            f"{source}: labels: a mapping {{search-space key: {{value: label}}}}; keys {sorted(set(labels) - set(space))} are not searched"
        )
    store = str(Path(storage or raw.get("storage") or DEFAULT_STORAGE).resolve())
    return Campaign(
        name=name, source=source, base=base, overrides=overrides, search_space=space, metric=metric, mode=mode,
        scheduler=_scheduler(raw.get("scheduler"), cfg, source), trial_cpus=trial_cpus,
        data=_data(_section(raw, "data", DATA_KEYS, source), cfg, store, source), storage=store,
        labels={k: {value_text(v): str(t) for v, t in m.items()} for k, m in labels.items()}, config=cfg, **counts,
    )  # fmt: skip
