"""Typed run configuration: one YAML file describes a whole run.

Every key has a default here, so a YAML file only states what differs. Unknown keys and values
of the wrong type are errors that name the key and the file: a typo in a config must never
silently fall back to a default and train the wrong model for days.

Derived values (``num_queries = n * T``) are properties, never stored, so they cannot disagree
with the values they come from (the official code hard-codes 360; users trip over it).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

QueryLevel = Literal["video", "frame", "instance", "prediction"]
_YAML11_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the source."""


@dataclass
class ModelConfig:
    """The network (paper §3.1, §4.1; official defaults in reference FACTS.md §a)."""

    backbone: str = "resnet50"
    # Path to torchvision ImageNet weights (or any state dict of the ResNet). Nothing is downloaded.
    backbone_weights: str | None = None
    # "frozen_bn": the official FrozenBatchNorm (statistics of the pretrained weights). A backbone
    # trained from scratch (no backbone_weights, e.g. tiny_cpu) has no statistics to freeze: its
    # identity "norm" lets layer4 drift into an input-independent offset (measured: features of
    # different clips at cosine 0.999, every prediction identical). "group_norm" normalises with
    # GroupNorm(32) and trains every layer, conv1 and layer1 included.
    backbone_norm: Literal["frozen_bn", "group_norm"] = "frozen_bn"
    dilation: bool = False
    hidden_dim: int = 384
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    num_frames: int = 36  # T
    num_slots: int = 10  # n: instance sequences per clip
    # Largest raw category id + 1 (official: 41 for YouTube-VIS ids 1..40). Logits are
    # num_classes + 1 wide: raw ids used unmapped, index 0 unused, no-object last (FACTS.md §a).
    num_classes: int = 41
    aux_loss: bool = True
    # Table 1 ablation switches.
    query_level: QueryLevel = "prediction"
    position_encoding: bool = True
    mask_features: Literal["transformer", "cnn"] = "transformer"
    mask_head: Literal["3d", "2d"] = "3d"
    # Mask-head widths [lay2, lay3, lay4, DCN output]; None = the official d/2, d/4, d/8, d/16
    # (192, 96, 48, 24 at d=384). GroupNorm groups are gcd(8, width) (gcd(4, width) in the 3-D head):
    # exactly the official GN(8, .) / GN(4, 12) at d=384, yet valid for small d, where d/16 = 6 would
    # break GroupNorm(8, .) and a 3-channel 3-D head would be too thin (tiny_cpu sets wider dims).
    mask_dims: list[int] | None = None
    # Hidden width of the 3-D instance-sequence head; None = half the DCN output (official 12).
    seq_head_dim: int | None = None

    @property
    def num_queries(self) -> int:
        return self.num_slots * self.num_frames

    def validate(self, source: str) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError(f"{source}: model.backbone={self.backbone!r}; expected one of {BACKBONES}")
        if self.backbone_norm == "group_norm" and self.backbone_weights is not None:
            raise ConfigError(
                f"{source}: model.backbone_norm=group_norm is for a backbone trained from scratch; "
                "pretrained backbone_weights carry BatchNorm statistics: use backbone_norm: frozen_bn"
            )
        if self.hidden_dim % 3 != 0 or (self.hidden_dim // 3) % 2 != 0:
            raise ConfigError(
                f"{source}: model.hidden_dim={self.hidden_dim} must be divisible by 3 with an even "
                "quotient (the 3-D sine encoding uses d/3 interleaved sin/cos channels per axis)"
            )
        if self.hidden_dim % self.nheads != 0:
            raise ConfigError(f"{source}: model.hidden_dim={self.hidden_dim} not divisible by nheads={self.nheads}")
        if self.hidden_dim % 8 != 0:
            raise ConfigError(
                f"{source}: model.hidden_dim={self.hidden_dim} must be divisible by 8 "
                "(the mask head's attention map uses 8 heads and GroupNorm(8, ·))"
            )
        for key in ("num_frames", "num_slots", "enc_layers", "dec_layers", "num_classes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{source}: model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{source}: model.dropout must be in [0, 1), got {self.dropout}")
        if self.mask_dims is not None and (len(self.mask_dims) != 4 or min(self.mask_dims) < 1):
            raise ConfigError(
                f"{source}: model.mask_dims={self.mask_dims} must be 4 positive widths "
                "[lay2, lay3, lay4, dcn_out], or null for the official d/2, d/4, d/8, d/16"
            )
        if self.seq_head_dim is not None and self.seq_head_dim < 1:
            raise ConfigError(f"{source}: model.seq_head_dim must be >= 1 or null, got {self.seq_head_dim}")


@dataclass
class LossConfig:
    """Matching costs and loss weights (DETR/VisTR defaults, FACTS.md §a, §c)."""

    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    ce_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 1.0
    dice_loss_coef: float = 1.0
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class DataConfig:
    """Where the data is and how clips are cut and augmented (FACTS.md §d)."""

    root: str | None = None  # dataset directory (annotations + frames) or None for synthetic
    train_ann: str = "annotations/instances_train_sub.json"
    val_ann: str = "annotations/instances_val_sub.json"
    train_frames: str = "train/JPEGImages"
    val_frames: str = "valid/JPEGImages"
    # Clip sampling: "official" = T consecutive frames ending at every frame, wrapping (FACTS §d);
    # "random_start" = one uniformly random window per video per epoch.
    sampling: Literal["official", "random_start"] = "official"
    time_order: Literal["in_order", "random"] = "in_order"  # Table 1c
    clip_stride: int = 1  # stride between clip starts when preprocessing
    # Final training resolution: shorter side, capped longer side (FACTS §d: 300 / 540).
    min_size: int = 300
    max_size: int = 540
    # Inference resize: shorter side; max_size None = no cap (official inference).
    test_min_size: int = 300
    test_max_size: int | None = None
    augment: bool = True
    multiscale: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_min: int = 384
    crop_max: int = 600
    photometric: bool = True
    hflip_prob: float = 0.5
    num_workers: int = 2
    # Clips each Ray Train worker holds in its shuffle buffer when reading shards (memory: this many
    # decoded clips). Shards store a video's clips consecutively: a small buffer gives batches of
    # near-identical clips. 0 = no shuffle beyond the random block order.
    shuffle_buffer: int = 32

    def validate(self, source: str) -> None:
        if self.min_size < 1 or (self.max_size is not None and self.max_size < self.min_size):
            raise ConfigError(f"{source}: data.min_size/max_size invalid ({self.min_size}/{self.max_size})")
        if self.clip_stride < 1:
            raise ConfigError(f"{source}: data.clip_stride must be >= 1, got {self.clip_stride}")


@dataclass
class TrainConfig:
    """Optimisation (paper §4.1, FACTS §a)."""

    lr: float = 1e-4
    lr_backbone: float = 1e-5  # 0 freezes the whole backbone
    weight_decay: float = 1e-4
    epochs: int = 18
    lr_drop: int = 12
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    batch_size: int = 1  # clips per worker per step
    seed: int = 42
    amp: bool = True  # only takes effect on CUDA
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 10
    validate_every: int = 1  # epochs; 0 disables periodic validation
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val_AP"
    checkpoint_mode: Literal["max", "min"] = "max"
    max_failures: int = 2
    # Path to a DETR or VisTR checkpoint used to initialise (paper §4.1: DETR COCO weights).
    init_weights: str | None = None
    # Optional cap on steps per epoch (useful for smoke runs and fixed-budget benchmarks).
    max_steps_per_epoch: int | None = None
    # Training time budget, counted from when the workers are up (start-up not included); the
    # epoch that runs out of time is finished (validated, saved) early.
    max_minutes: float | None = None
    # Distributed training (`vistr train`): Ray Train workers and what each one holds.
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    # Ray Train run storage: a local directory or any pyarrow URI (s3://, gs://, ...: shared
    # storage on a multi-node cluster); None = <project>/runs/ray.
    storage_path: str | None = None

    def validate(self, source: str) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"{source}: train.epochs and train.batch_size must be >= 1")
        if self.lr <= 0 or self.lr_backbone < 0:
            raise ConfigError(f"{source}: train.lr must be > 0 and train.lr_backbone >= 0")
        if self.num_workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker < 0:
            raise ConfigError(
                f"{source}: train.num_workers must be >= 1 and gpus_per_worker / cpus_per_worker >= 0"
            )


@dataclass
class TuneConfig:
    """Defaults for Ray Tune campaigns; campaign files override these."""

    metric: str = "val_AP"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 1
    scheduler: Literal["asha", "fifo"] = "fifo"
    grace_period: int = 1
    max_concurrent_trials: int = 1


@dataclass
class TrackingConfig:
    """MLflow tracking. None = the project's local sqlite store under runs/ (or $MLFLOW_TRACKING_URI)."""

    tracking_uri: str | None = None
    experiment: str = "vistr"
    registered_model: str = "vistr"
    promotion_margin: float = 0.0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, source: str = "<config>") -> Config:
        for section in dataclasses.fields(self):
            check = getattr(getattr(self, section.name), "validate", None)
            if check is not None:
                check(source)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"model.hidden_dim": 384, ...}``: for MLflow params and Tune search spaces."""
        return flatten(self.to_dict())

    def hash(self, sections: tuple[str, ...] | None = None) -> str:
        """Stable content hash (of all sections, or only the named ones): step identity for caching."""
        data = self.to_dict()
        if sections is not None:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def with_overrides(self, overrides: dict[str, Any], source: str = "<overrides>") -> Config:
        """A copy with dotted-key overrides applied (``{"train.lr": 3e-4}``), fully re-validated."""
        data = self.to_dict()
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise ConfigError(f"{source}: {unknown_key_message(dotted, self.flat())}")
                node = node[part]
            if leaf not in node:
                raise ConfigError(f"{source}: {unknown_key_message(dotted, self.flat())}")
            node[leaf] = value
        return from_dict(data, source)


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """"unknown config key 'train.lrr' (did you mean train.lr?)": a typo'd key names its fix."""
    near = difflib.get_close_matches(key, list(known), n=3)
    return f"unknown config key {key!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")


def parse_overrides(items: list[str], source: str = "--set") -> dict[str, Any]:
    """``["train.lr=3e-4", "model.num_frames=6"]`` (command-line ``--set``) -> dotted overrides;
    values are read as YAML, so numbers, booleans, lists and null keep their types."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
        out[key.strip()] = yaml.safe_load(value)
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: {key} must not be null")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}={value!r}; expected one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; everyone writes it
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation in (bool, str):
        if not isinstance(value, annotation):
            raise ConfigError(
                f"{source}: {key} must be a {annotation.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key, source)
    raise ConfigError(f"{source}: {key}: unsupported annotation {annotation!r}")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{source}: unknown config key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name, source)
        for name, value in data.items()
    }
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None, source: str = "<dict>") -> Config:
    return _build(Config, data, "", source).validate(source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (a preset name like ``tiny_cpu`` also works) and apply overrides."""
    path = resolve_preset(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    cfg = from_dict(data, str(path))
    if not overrides:
        return cfg
    # Name the overrides (often `--set`) in errors: the file itself was valid.
    listed = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
    return cfg.with_overrides(overrides, f"{path} with overrides {listed}")


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def resolve_preset(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or the name of a bundled preset (``paper_r50``, ``tiny_cpu``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{Path(str(name_or_path)).stem}.yaml"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"{name_or_path}: no such config file or preset (presets: {', '.join(known)})")
