"""Checkpoints: ours (model + optimizer + schedule + config), official VisTR, DETR initialisation.

Our files are written to a temporary file beside the target and renamed, so a crash mid-write
never leaves a truncated checkpoint that a resumed run would pick up. Loading is strict: a key
that is missing or left over means the file and the model disagree, and silently training or
evaluating a half-initialised model is worse than an error naming the keys.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vistr.config import Config, ModelConfig, from_dict
from vistr.models import build_model
from vistr.models.vistr import VisTR

FORMAT = "vistr-checkpoint"
FORMAT_VERSION = 1
_LIST_LIMIT = 12


class CheckpointError(ValueError):
    """A checkpoint file or state dict does not match what was asked for; the message says how."""


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys)} in total)" if len(keys) > _LIST_LIMIT else "")


def load_state_dict_strict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "<state dict>"
) -> None:
    """``model.load_state_dict(state, strict=True)`` with an error that names every mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
        problems.append(f"shape mismatches: {_names(shapes)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _read(path_or_state: str | os.PathLike | dict, what: str) -> tuple[dict, str]:
    if isinstance(path_or_state, dict):
        return path_or_state, f"<{what} dict>"
    path = Path(path_or_state)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    return torch.load(path, map_location="cpu", weights_only=False), str(path)


def _model_state(payload: dict, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint ({"model": ...}) or the payload itself if it is one."""
    state = payload.get("model", payload)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: no model state dict (expected a dict with a 'model' entry)")
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


# ---------------------------------------------------------------- our checkpoints


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    epoch: int = 0,
    global_step: int = 0,
    config: Config | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write model/optimizer/scheduler state, progress counters and the run config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "global_step": global_step,
        "config": config.to_dict() if config is not None else None,
        "extra": extra or {},
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Read one of our checkpoints and restore the given objects (strictly); returns the payload.

    ``payload["config"]`` is the saved config as a dict (``config_from_checkpoint`` rebuilds it).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a vistr checkpoint (no format={FORMAT!r}); official VisTR files load with "
            "load_official_vistr(), DETR files with load_detr_init()"
        )
    if model is not None:
        load_state_dict_strict(model, payload["model"], str(path))
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            if payload.get(name) is None:
                raise CheckpointError(f"{path}: has no {name} state to restore")
            obj.load_state_dict(payload[name])
    return payload


def config_from_checkpoint(payload: dict[str, Any], source: str = "<checkpoint>") -> Config:
    if payload.get("config") is None:
        raise CheckpointError(f"{source}: the checkpoint stores no config; build the model from your config")
    return from_dict(payload["config"], source)


def model_from_checkpoint(path: str | os.PathLike) -> tuple[VisTR, Config]:
    """Rebuild the model from the config stored in our checkpoint and load its weights (eval mode)."""
    payload = load_checkpoint(path)
    cfg = config_from_checkpoint(payload, str(path))
    # The stored weights replace any ImageNet init, and that file may not exist on this machine.
    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None)))
    load_state_dict_strict(model, payload["model"], str(path))
    return model.eval(), cfg


# ---------------------------------------------------------------- official VisTR / DETR files


def official_model_config(
    backbone: str = "resnet50", num_frames: int = 36, num_slots: int = 10, **overrides: Any
) -> ModelConfig:
    """The ModelConfig of the released checkpoints (FACTS.md §a): d=384, 6+6 layers, 41 classes."""
    cfg = ModelConfig(backbone=backbone, num_frames=num_frames, num_slots=num_slots, **overrides)
    cfg.validate("official VisTR config")
    return cfg


def infer_backbone(state: dict[str, torch.Tensor]) -> str | None:
    """The ResNet depth of a VisTR/DETR state dict from its layer3 block count (None if unknown)."""
    prefix = "vistr.backbone.0.body."
    blocks = {k[len(prefix) :].split(".")[1] for k in state if k.startswith(prefix + "layer3.")}
    bottleneck = any(k.startswith(prefix + "layer1.0.conv3.") for k in state)
    table = {6: "resnet50", 23: "resnet101"} if bottleneck else {2: "resnet18", 6: "resnet34"}
    return table.get(len(blocks))


def load_official_vistr(
    path_or_state_dict: str | os.PathLike | dict,
    backbone: str | None = None,
    num_frames: int = 36,
    num_slots: int = 10,
    **overrides: Any,
) -> VisTR:
    """Build VisTR like the official ``--masks`` model and load an official checkpoint strictly.

    Accepts the released ``vistr_r50.pth`` / ``vistr_r101.pth`` (a dict with "model") or a bare
    state dict. ``backbone=None`` infers resnet50/101 from the keys; an explicit value that
    disagrees with the file is an error (the official inference.py's resnet101 default silently
    broke the R50 file, issue #22). ``num_frames`` times ``num_slots`` must equal the checkpoint's
    query count. Returned in eval mode.
    """
    payload, source = _read(path_or_state_dict, "official VisTR checkpoint")
    state = _model_state(payload, source)
    found = infer_backbone(state)
    if backbone is None:
        if found is None:
            raise CheckpointError(f"{source}: cannot tell the ResNet depth from the keys; pass backbone=...")
        backbone = found
    elif found is not None and found != backbone:
        raise CheckpointError(
            f"{source}: the file holds a {found} backbone but backbone={backbone!r} was asked for"
        )
    queries = state.get("vistr.query_embed.weight")
    if queries is not None and queries.shape[0] != num_frames * num_slots:
        raise CheckpointError(
            f"{source}: query_embed has {queries.shape[0]} queries but num_frames*num_slots = "
            f"{num_frames}*{num_slots} = {num_frames * num_slots}"
        )
    model = VisTR(official_model_config(backbone, num_frames, num_slots, **overrides), train_backbone=True)
    load_state_dict_strict(model, state, source)
    return model.eval()


@dataclass
class InitReport:
    """What ``load_detr_init`` did; the caller logs it (DETR lacks the DCN and 3-D head, by design)."""

    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)  # "key ckpt_shape -> model_shape"
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model (lay5, out_lay)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file (keeps its init)


def load_detr_init(model: nn.Module, path_or_state_dict: str | os.PathLike | dict) -> InitReport:
    """Initialise from a DETR (COCO) or VisTR checkpoint (paper §4.1), skipping what cannot fit.

    ``detr.`` keys are renamed ``vistr.``; keys whose shapes differ (class_embed for another class
    count, query_embed for another n·T) keep the model's init and are listed, as are DETR's
    mask_head.lay5/out_lay (unexpected) and the DCN / 3-D head (missing).
    """
    payload, source = _read(path_or_state_dict, "DETR checkpoint")
    state = {
        ("vistr." + k[len("detr.") :] if k.startswith("detr.") else k): v
        for k, v in _model_state(payload, source).items()
    }
    own = model.state_dict()
    report = InitReport(
        unexpected=sorted(set(state) - set(own)),
        missing=sorted(set(own) - set(state)),
    )
    usable = {}
    for key in sorted(set(state) & set(own)):
        if tuple(state[key].shape) == tuple(own[key].shape):
            usable[key] = state[key]
            report.loaded.append(key)
        else:
            report.shape_mismatch.append(f"{key} {tuple(state[key].shape)} -> {tuple(own[key].shape)}")
    if not usable:
        raise CheckpointError(f"{source}: no key matches the model; is this a DETR/VisTR checkpoint?")
    model.load_state_dict(usable, strict=False)
    return report
