"""Training and validation loops in plain PyTorch: the one loop every launcher runs.

Ray Train workers, Tune trials and single-process debugging all call these two functions, so
there is no second training loop to drift. Nothing here knows about Ray or MLflow: callers get
metrics through ``on_log`` and decide where they go.

A batch is a dict ``{"frames": [B,T,3,H,W], "pad_mask": [B,T,H,W] | None, "targets": [dict]*B}``
(see ``vistr.data.clips.collate_clips``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf: training on would only produce garbage, so it stops here."""


@dataclass
class EpochStats:
    """What one pass over a loader measured (means over steps)."""

    losses: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    wall_s: float = 0.0
    data_wait_s: float = 0.0
    global_step: int = 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.wall_s if self.wall_s > 0 else 0.0


def move_to_device(batch: dict[str, Any], device: torch.device, non_blocking: bool = False) -> dict[str, Any]:
    """Tensors (also inside the per-clip target dicts) to ``device``; other values unchanged."""

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=non_blocking)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v) for v in value]
        return value

    return move(batch)


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only (bf16 where supported, else fp16 with a grad scaler)."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.amp.GradScaler("cuda")
    return None


def _video_ids(batch: dict[str, Any]) -> list[Any]:
    return [t.get("video_id") for t in batch.get("targets", [])]


def _to_floats(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in terms.items()}


def _check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], batch: dict, where: str) -> None:
    if torch.isfinite(loss):
        return
    bad = {k: v for k, v in _to_floats(terms).items() if not math.isfinite(v)}
    raise NonFiniteLossError(
        f"non-finite loss {float(loss.detach())} at {where} on videos {_video_ids(batch)}; non-finite terms: {bad}. "
        "Lower the learning rate, check these videos' annotations, or resume from the last checkpoint."
    )


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    epoch: int = 0,
    global_step: int = 0,
    clip_max_norm: float = 0.0,
    amp: bool = False,
    scaler: torch.amp.GradScaler | None = None,
    max_steps: int | None = None,
    deadline: float | None = None,
    log_every: int = 10,
    on_log: Callable[[dict[str, float], int], None] | None = None,
    before_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over ``loader``; returns mean loss terms and throughput.

    ``global_step`` continues across epochs and restarts so logged step numbers never repeat.
    ``before_step(global_step)`` runs before each optimisation step (fault injection, profiling).
    ``deadline`` (a ``time.monotonic()`` value) ends the epoch early for fixed-budget runs.
    """
    model.train()
    criterion.train()
    sums: dict[str, float] = defaultdict(float)
    stats = EpochStats(global_step=global_step)
    start = time.monotonic()
    fetch_start = start
    for batch in loader:
        stats.data_wait_s += time.monotonic() - fetch_start
        if before_step is not None:
            before_step(stats.global_step)
        batch = move_to_device(batch, device, non_blocking=device.type == "cuda")
        with autocast_context(device, amp):
            outputs = model(batch["frames"], batch.get("pad_mask"))
            terms = criterion(outputs, batch["targets"])
        loss = terms["loss"]
        _check_finite(loss, terms, batch, f"epoch {epoch} step {stats.global_step}")

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_max_norm > 0:
            norm = nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
            # A finite loss can still have NaN/Inf gradients; stop before they reach the weights.
            # (With an fp16 grad scaler, inf gradients are expected: the scaler skips that step.)
            if scaler is None and not torch.isfinite(norm):
                raise NonFiniteLossError(
                    f"non-finite gradient norm at epoch {epoch} step {stats.global_step} on videos "
                    f"{_video_ids(batch)} (loss {float(loss.detach()):.4g}); the weights were not updated. "
                    "Lower the learning rate or resume from the last checkpoint."
                )
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

        stats.steps += 1
        stats.global_step += 1
        stats.samples += len(batch["targets"])
        values = _to_floats(terms)
        for key, value in values.items():
            sums[key] += value
        if on_log is not None and log_every > 0 and stats.global_step % log_every == 0:
            record = {f"train/{k}": v for k, v in values.items()}
            for group in optimizer.param_groups:
                record[f"lr/{group.get('name', 'group')}"] = group["lr"]
            on_log(record, stats.global_step)
        if (max_steps is not None and stats.steps >= max_steps) or (
            deadline is not None and time.monotonic() >= deadline
        ):
            break
        fetch_start = time.monotonic()
    stats.wall_s = time.monotonic() - start
    stats.losses = {k: v / max(stats.steps, 1) for k, v in sums.items()}
    return stats


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable[dict[str, Any]],
    device: torch.device,
    *,
    amp: bool = False,
    on_outputs: Callable[[dict[str, torch.Tensor], dict[str, Any]], None] | None = None,
) -> EpochStats:
    """Mean loss terms over ``loader`` in eval mode; ``on_outputs`` sees each batch's predictions
    (the inference/evaluation code turns them into YouTube-VIS results there)."""
    model.eval()
    criterion.eval()
    sums: dict[str, float] = defaultdict(float)
    stats = EpochStats()
    start = time.monotonic()
    for batch in loader:
        batch = move_to_device(batch, device)
        with autocast_context(device, amp):
            outputs = model(batch["frames"], batch.get("pad_mask"))
            terms = criterion(outputs, batch["targets"])
        _check_finite(terms["loss"], terms, batch, f"validation step {stats.steps}")
        if on_outputs is not None:
            on_outputs(outputs, batch)
        stats.steps += 1
        stats.samples += len(batch["targets"])
        for key, value in _to_floats(terms).items():
            sums[key] += value
    stats.wall_s = time.monotonic() - start
    stats.losses = {k: v / max(stats.steps, 1) for k, v in sums.items()}
    return stats


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = the first CUDA device if there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use 'cpu' or 'auto'")
    return device
