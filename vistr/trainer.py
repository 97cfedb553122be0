"""Single-process training: the same engine as Ray Train, driven by a plain epoch loop.

Used for debugging, for the embedded demo on a laptop, and as the reference the distributed
loop is compared against. Every epoch ends with an atomic checkpoint, so a stopped run resumes
where it stopped (``resume=True``) with the global step and learning-rate schedule intact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vistr.checkpoint import load_checkpoint, save_checkpoint
from vistr.config import Config
from vistr.data.clips import ClipDataset, collate_clips
from vistr.engine import EpochStats, make_grad_scaler, resolve_device, train_one_epoch
from vistr.losses import build_criterion
from vistr.models import build_model
from vistr.optim import build_optimizer, build_scheduler

LogFn = Callable[[dict[str, float], int], None]
# (model, epoch) -> metrics such as {"val_AP": ...}; called every ``train.validate_every`` epochs.
ValidateFn = Callable[[torch.nn.Module, int], dict[str, float]]


@dataclass
class FitResult:
    checkpoint: Path
    epochs_done: int
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)


def _loader(cfg: Config, root: str | Path, epoch: int) -> DataLoader:
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
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg).to(device)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    scaler = make_grad_scaler(device, cfg.train.amp)
    checkpoint = Path(out_dir) / "checkpoint.pt"
    epoch, global_step, history = 0, 0, []
    if resume and checkpoint.exists():
        payload = load_checkpoint(checkpoint, model, optimizer, scheduler, map_location=device)
        epoch, global_step = payload["epoch"] + 1, payload["global_step"]
        history = payload.get("extra", {}).get("history", [])

    deadline = None if cfg.train.max_minutes is None else time.monotonic() + 60 * cfg.train.max_minutes
    while epoch < cfg.train.epochs:
        stats: EpochStats = train_one_epoch(
            model, criterion, _loader(cfg, root, epoch), optimizer, device,
            epoch=epoch, global_step=global_step, clip_max_norm=cfg.train.clip_max_norm,
            amp=cfg.train.amp, scaler=scaler, max_steps=cfg.train.max_steps_per_epoch,
            deadline=deadline, log_every=cfg.train.log_every, on_log=on_log,
        )
        global_step = stats.global_step
        scheduler.step()
        record = {f"epoch/{k}": v for k, v in stats.losses.items()}
        record.update(epoch=epoch, samples_per_s=stats.samples_per_s, data_wait_fraction=stats.data_wait_fraction)
        every = cfg.train.validate_every
        out_of_time = deadline is not None and time.monotonic() >= deadline
        if validate is not None and every > 0 and ((epoch + 1) % every == 0 or out_of_time):
            record.update(validate(model, epoch))
        history.append(record)
        if on_log is not None:
            on_log(record, global_step)
        save_checkpoint(
            checkpoint, model, optimizer, scheduler, epoch=epoch, global_step=global_step,
            config=cfg, extra={"history": history},
        )
        epoch += 1
        if out_of_time:
            break
    return FitResult(checkpoint, epoch, global_step, history)
