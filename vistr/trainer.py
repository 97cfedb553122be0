"""The epoch loop every launcher shares, and the single-process trainer built on it.

``run_epochs`` is the only epoch loop: ``fit`` (debugging, the embedded demo, the reference the
distributed run is compared against) and the Ray Train worker (``pipelines/train.py``) both call
it, passing what differs as functions: where batches come from, where a finished epoch is saved
(an atomic local file here, ``ray.train.report`` there) and when time is up (a clock here, a
decision agreed by all workers there, so no rank starts an epoch the others skip). Every epoch
ends with a checkpoint, so a stopped run resumes with the global step and the learning-rate
schedule intact.

``validate_clips`` is periodic validation as the official inference scores a split: one clip of
the first T frames per video (cycled when shorter), postprocessed into YouTube-VIS results.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from vistr.checkpoint import load_checkpoint, load_detr_init, save_checkpoint
from vistr.config import Config
from vistr.data.clips import ClipDataset, collate_clips
from vistr.engine import EpochStats, make_grad_scaler, resolve_device, train_one_epoch
from vistr.inference import clip_tracks, tracks_to_results
from vistr.losses import build_criterion
from vistr.models import build_model
from vistr.optim import build_optimizer, build_scheduler

LogFn = Callable[[dict[str, float], int], None]
# (model, epoch) -> metrics such as {"val_AP": ...}; called every ``train.validate_every`` epochs.
ValidateFn = Callable[[nn.Module, int], dict[str, float]]


@dataclass
class TrainState:
    """Everything an epoch changes; ``epoch`` is the next epoch to run."""

    model: nn.Module  # possibly DDP-wrapped; ``unwrap`` gives the module with the official names
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    epoch: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def unwrapped(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def save(self, path: str | Path, cfg: Config, epoch: int, extra: dict[str, Any] | None = None) -> Path:
        """Checkpoint after ``epoch`` (unwrapped weights: names stay those of the official model)."""
        return save_checkpoint(
            path, self.unwrapped, self.optimizer, self.scheduler, epoch=epoch,
            global_step=self.global_step, config=cfg, extra={"history": self.history, **(extra or {})},
        )  # fmt: skip

    def restore(self, path: str | Path) -> None:
        """Continue after the epoch saved in ``path`` (strict: the file must match this model)."""
        payload = load_checkpoint(path, self.unwrapped, self.optimizer, self.scheduler, self.device)
        self.epoch, self.global_step = payload["epoch"] + 1, payload["global_step"]
        self.history = payload.get("extra", {}).get("history", [])


def build_state(
    cfg: Config, device: torch.device, wrap: Callable[[nn.Module], nn.Module] | None = None
) -> TrainState:
    """Model (on ``device``, then ``wrap``-ped, e.g. into DDP), loss, AdamW, step decay, scaler."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    model = build_model(cfg)
    if cfg.train.init_weights:  # paper §4.1: start from DETR (COCO) weights where shapes fit
        report = load_detr_init(model, cfg.train.init_weights)
        print(
            f"init from {cfg.train.init_weights}: {len(report.loaded)} tensors loaded, "
            f"{len(report.shape_mismatch)} skipped for shape ({', '.join(report.shape_mismatch[:3])}"
            f"{', ...' if len(report.shape_mismatch) > 3 else ''}), {len(report.missing)} keep their init",
            file=sys.stderr,
        )
    model = model.to(device)
    if wrap is not None:
        model = wrap(model)
    optimizer = build_optimizer(model, cfg.train)
    return TrainState(
        model=model,
        criterion=build_criterion(cfg).to(device),
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train),
        device=device,
        scaler=make_grad_scaler(device, cfg.train.amp),
    )


def run_epochs(
    cfg: Config,
    state: TrainState,
    batches: Callable[[int], Iterable[dict[str, Any]]],
    save: Callable[[TrainState, dict[str, float]], None],
    *,
    time_up: Callable[[], bool] = lambda: False,
    deadline: float | None = None,
    on_log: LogFn | None = None,
    validate: ValidateFn | None = None,
    before_step: Callable[[int], None] | None = None,
) -> None:
    """Train from ``state.epoch`` to ``train.epochs`` (or until ``time_up()``), saving every epoch.

    ``batches(epoch)`` yields the epoch's batches; ``save(state, record)`` persists the finished
    epoch (``record``: mean losses, throughput, validation metrics); ``deadline`` is passed to the
    engine to end an epoch early (distributed callers stop inside their batch iterator instead).
    The epoch that runs out of time is validated and saved like any other, then the loop stops.
    """
    while state.epoch < cfg.train.epochs and not time_up():
        epoch = state.epoch
        stats: EpochStats = train_one_epoch(
            state.model, state.criterion, batches(epoch), state.optimizer, state.device,
            epoch=epoch, global_step=state.global_step, clip_max_norm=cfg.train.clip_max_norm,
            amp=cfg.train.amp, scaler=state.scaler, max_steps=cfg.train.max_steps_per_epoch,
            deadline=deadline, log_every=cfg.train.log_every, on_log=on_log, before_step=before_step,
        )  # fmt: skip
        state.global_step = stats.global_step
        state.scheduler.step()
        record = {f"epoch/{k}": v for k, v in stats.losses.items()}
        record.update(
            epoch=epoch, global_step=stats.global_step, steps=stats.steps,
            samples_per_s=stats.samples_per_s, data_wait_fraction=stats.data_wait_fraction,
        )  # fmt: skip
        out_of_time = time_up()
        every = cfg.train.validate_every
        if validate is not None and every > 0 and ((epoch + 1) % every == 0 or out_of_time):
            record.update(validate(state.model, epoch))
        state.history.append(record)
        if on_log is not None:
            on_log(record, state.global_step)
        save(state, record)
        state.epoch += 1
        if out_of_time:
            break


@dataclass
class FitResult:
    checkpoint: Path
    epochs_done: int
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)


def _loader(cfg: Config, root: str | Path, epoch: int, pin_memory: bool = False) -> DataLoader:
    """One epoch's batches; pinned on CUDA so the engine's non_blocking copy overlaps the step."""
    data = ClipDataset.from_config(cfg, "train", root=root)
    data.set_epoch(epoch)
    generator = torch.Generator().manual_seed(cfg.train.seed + epoch)
    return DataLoader(
        data,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_clips,
        drop_last=len(data) >= cfg.train.batch_size,
        pin_memory=pin_memory,
    )


def fit(
    cfg: Config,
    root: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = True,
    on_log: LogFn | None = None,
    validate: ValidateFn | None = None,
) -> FitResult:
    """Train ``cfg`` on the dataset at ``root``; checkpoints go to ``out_dir/checkpoint.pt``.

    ``train.max_minutes`` bounds the whole run (the current epoch ends early and is checkpointed).
    """
    state = build_state(cfg, resolve_device(cfg.train.device))
    checkpoint = Path(out_dir) / "checkpoint.pt"
    if resume and checkpoint.exists():
        state.restore(checkpoint)
    deadline = None if cfg.train.max_minutes is None else time.monotonic() + 60 * cfg.train.max_minutes
    run_epochs(
        cfg, state, lambda epoch: _loader(cfg, root, epoch, pin_memory=state.device.type == "cuda"),
        save=lambda st, record: st.save(checkpoint, cfg, st.epoch),
        time_up=lambda: deadline is not None and time.monotonic() >= deadline,
        deadline=deadline, on_log=on_log, validate=validate,
    )  # fmt: skip
    return FitResult(checkpoint, state.epoch, state.global_step, state.history)


# ---------------------------------------------------------------- periodic validation


def inference_frame_ids(length: int, num_frames: int) -> np.ndarray:
    """The frames the official inference feeds for a video: the first T, cycled 0..L-1,0,1,...
    when the video is shorter (FACTS.md §e)."""
    return np.arange(num_frames) % length


@torch.no_grad()
def validate_clips(
    model: nn.Module,
    clips: Iterable[tuple[torch.Tensor, dict[str, Any], int]],
    num_slots: int,
    device: torch.device,
) -> list[dict]:
    """YouTube-VIS results of ``(frames [T,3,H,W] normalised, target, video length)`` clips.

    Each clip holds its video's ``inference_frame_ids``; predictions cover ``min(length, T)``
    frames at the original size (``target["orig_size"]``), as the official inference writes them.
    """
    was_training = model.training
    model.eval()
    results: list[dict] = []
    try:
        for frames, target, length in clips:
            out = model(frames[None].to(device))
            tracks = clip_tracks(
                out["pred_logits"][0], out["pred_masks"][0], num_slots,
                tuple(target["orig_size"]), length=length,
            )  # fmt: skip
            results += tracks_to_results(tracks, target["video_id"])
    finally:
        model.train(was_training)
    return results
