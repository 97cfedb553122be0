"""It learns: the real tiny_cpu model, the Hungarian loss and the engine overfit a few synthetic clips.

Everything here is the production path (synthetic generator -> ClipDataset -> collate ->
build_model / build_criterion / build_optimizer -> train_one_epoch); only the data is tiny.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vistr.config import load_config
from vistr.data.clips import ClipDataset, collate_clips
from vistr.data.transforms import build_transforms
from vistr.engine import evaluate, train_one_epoch
from vistr.losses import build_criterion
from vistr.matcher import frame_pairs
from vistr.models import build_model
from vistr.optim import build_optimizer

# A step budget, not a time budget, so a busy machine is slower but never fails it: the loss
# target is reached in ~300 steps and the IoU target in ~1000 (~3 minutes on an idle 2-core
# machine); the loop stops as soon as both are reached.
MAX_EPOCHS = 200  # x 10 steps


def _fixed_batches(root: Path, cfg) -> list[dict]:
    """Four clips from four different videos, deterministic (eval transform), two per batch."""
    data = ClipDataset.from_config(cfg, "train", root=root)
    data.transform = build_transforms(cfg.data, train=False)
    first_item_of_video = {}
    for index, (video_id, _) in enumerate(data.items):
        first_item_of_video.setdefault(video_id, index + cfg.model.num_frames - 1)
    indices = sorted(first_item_of_video.values())[:4]
    items = [data[i] for i in indices]
    return [collate_clips(items[:2]), collate_clips(items[2:])]


@torch.no_grad()
def _matched_mask_iou(model, criterion, batches) -> float:
    """Mean video IoU of the matched (slot, instance) mask sequences over their valid frames."""
    model.eval()
    ious = []
    for batch in batches:
        out = model(batch["frames"], batch["pad_mask"])
        matches = criterion.matcher(out, batch["targets"])
        pairs = frame_pairs(matches, batch["targets"], criterion.matcher.num_slots)
        inter: dict[tuple[int, int], float] = {}
        union: dict[tuple[int, int], float] = {}
        for b, q, k, t in zip(*(p.tolist() for p in pairs), strict=True):
            gt = batch["targets"][b]["masks"][k, t].bool()
            logits = out["pred_masks"][b, q][None, None]
            h, w = batch["frames"].shape[-2:]
            pred = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0
            pred = pred[: gt.shape[0], : gt.shape[1]]
            inter[b, k] = inter.get((b, k), 0.0) + float((pred & gt).sum())
            union[b, k] = union.get((b, k), 0.0) + float((pred | gt).sum())
        ious += [inter[key] / max(union[key], 1.0) for key in inter]
    return sum(ious) / len(ious)


def test_tiny_model_overfits_synthetic_clips(synth_root: Path) -> None:
    torch.manual_seed(0)
    # Frames at their generated 48x64 (no upscaling): the same clips, 1.8x fewer pixels per step.
    cfg = load_config("tiny_cpu", overrides={"data.test_min_size": 48, "data.test_max_size": 64})
    batches = _fixed_batches(synth_root, cfg)
    assert all(len(t["labels"]) for b in batches for t in b["targets"])
    model, criterion = build_model(cfg), build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.train)
    device = torch.device("cpu")
    initial = evaluate(model, criterion, batches, device).losses["loss"]

    start, epoch, final, iou = time.monotonic(), 0, initial, 0.0
    while epoch < MAX_EPOCHS:
        train_one_epoch(model, criterion, batches * 5, optimizer, device, epoch=epoch,
                        clip_max_norm=cfg.train.clip_max_norm)
        epoch += 1
        final = evaluate(model, criterion, batches, device).losses["loss"]
        if final <= 0.15 * initial:
            iou = _matched_mask_iou(model, criterion, batches)
            if iou >= 0.75:
                break
    iou = iou or _matched_mask_iou(model, criterion, batches)
    print(f"loss {initial:.3f} -> {final:.3f} after {epoch} epochs ({time.monotonic() - start:.0f}s), IoU {iou:.3f}")
    assert final <= 0.2 * initial, f"loss only fell from {initial:.3f} to {final:.3f}"
    assert iou >= 0.7, f"matched mask IoU {iou:.3f} < 0.7"
