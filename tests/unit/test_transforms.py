"""Clip transforms: official resize rule, clip-wide geometry, masks/boxes kept consistent."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vistr.config import DataConfig, load_config
from vistr.data.clips import load_clip
from vistr.data.transforms import MEAN, STD, build_transforms, normalize_uint8, resized_size
from vistr.data.ytvis import YTVIS, mask_bbox


@pytest.mark.parametrize(
    "hw, size, max_size, expected",
    [
        ((480, 640), 300, 540, (300, 400)),
        (
            (300, 1000),
            300,
            540,
            (162, 540),
        ),  # capped: s = round(540*300/1000) = 162; long = int(162*1000/300)
        ((720, 1280), 300, None, (300, 533)),  # int truncation of 533.33, no cap (official inference)
        ((100, 50), 300, None, (600, 300)),  # portrait
        ((64, 96), 64, 96, (64, 96)),  # already the right size
        ((333, 500), 300, 540, (300, 450)),
    ],
)
def test_resized_size_official_rule(hw: tuple[int, int], size: int, max_size: int | None, expected) -> None:
    assert resized_size(*hw, size, max_size) == expected


@pytest.fixture(scope="module")
def clips(synth_root: Path) -> list[tuple[np.ndarray, dict]]:
    ytvis = YTVIS.load(synth_root / "annotations/instances_train_sub.json", synth_root / "train/JPEGImages")
    return [load_clip(ytvis, vid, list(range(5))) for vid in ytvis.video_ids]


def _denormalize(frames: torch.Tensor) -> torch.Tensor:
    return frames * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]


def _xyxy_px(target: dict) -> torch.Tensor:
    h, w = target["size"]
    cx, cy, bw, bh = (target["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


@pytest.mark.parametrize(
    "sizes", [dict(), dict(min_size=24, max_size=40, multiscale=[30, 40], crop_min=20, crop_max=36)]
)
def test_augmented_masks_and_boxes_agree(clips, sizes: dict) -> None:
    cfg = dataclasses.replace(load_config("tiny_cpu").data, **sizes)
    transform = build_transforms(cfg, train=True)
    checked = 0
    for seed in range(6):
        for frames, target in clips:
            torch.manual_seed(seed)
            out, t = transform(frames, target)
            h, w = t["size"]
            assert out.shape == (5, 3, h, w) and t["masks"].shape[-2:] == (h, w)
            assert (h, w) == resized_size(h, w, cfg.min_size, cfg.max_size)  # final resize applied
            assert torch.equal(t["valid"], target["valid"])
            assert not t["boxes"][~t["valid"]].any()
            for k, j in zip(*torch.nonzero(t["valid"], as_tuple=True), strict=True):
                cx, cy, bw, bh = (t["boxes"][k, j] * torch.tensor([w, h, w, h])).tolist()
                box = mask_bbox(t["masks"][k, j].numpy())
                if box is None:  # cropped away: a sliver under ~1.5 px (torch nearest = floor sampling)
                    assert min(bw, bh) <= 1.5
                    continue
                x, y, mw, mh = box
                assert np.allclose(
                    [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], [x, y, x + mw, y + mh], atol=1.0
                )
                checked += 1
    assert checked > 50


def test_box_path_matches_mask_path_on_rectangles() -> None:
    """Boxes of rectangles go through flip/resize/crop like their masks: run the same transform
    once with empty masks (boxes from the box kernels) and once with the masks (mask boxes)."""
    rng = np.random.default_rng(0)
    k, t, h, w = 6, 3, 48, 64
    masks = torch.zeros(k, t, h, w, dtype=torch.bool)
    boxes = torch.zeros(k, t, 4)
    for i in range(k):
        for j in range(t):
            x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            x1, y1 = x0 + int(rng.integers(4, 10)), y0 + int(rng.integers(4, 10))
            masks[i, j, y0:y1, x0:x1] = True
            boxes[i, j] = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
    target = {"masks": masks, "boxes": boxes, "valid": torch.ones(k, t, dtype=torch.bool)}
    frames = np.zeros((t, h, w, 3), dtype=np.uint8)
    cfg = dataclasses.replace(load_config("tiny_cpu").data, photometric=False)
    transform = build_transforms(cfg, train=True)
    compared = 0
    for seed in range(10):
        torch.manual_seed(seed)
        _, from_masks = transform(frames, target)
        torch.manual_seed(seed)
        _, from_boxes = transform(frames, {**target, "masks": torch.zeros_like(masks)})
        nonempty = from_masks["masks"].flatten(2).any(-1)
        a, b = _xyxy_px(from_masks), _xyxy_px(from_boxes)
        assert (a - b)[nonempty].abs().max() <= 1.0
        compared += int(nonempty.sum())
        cropped_away = b[~nonempty]
        assert (
            torch.minimum(cropped_away[:, 2] - cropped_away[:, 0], cropped_away[:, 3] - cropped_away[:, 1])
            <= 1.5
        ).all()
    assert compared > 100


def test_geometry_identical_across_frames_photometric_per_frame(clips) -> None:
    frames, target = clips[0]
    same_frames = np.repeat(frames[:1], 8, axis=0)
    same_target = {
        **target,
        "masks": target["masks"][:, :1].repeat(1, 8, 1, 1),
        "boxes": target["boxes"][:, :1].repeat(1, 8, 1),
        "valid": target["valid"][:, :1].repeat(1, 8),
    }
    base = load_config("tiny_cpu").data
    for photometric in (False, True):
        transform = build_transforms(dataclasses.replace(base, photometric=photometric), train=True)
        for seed in range(4):
            torch.manual_seed(seed)
            out, t = transform(same_frames, same_target)
            assert (t["masks"] == t["masks"][:, :1]).all() and (t["boxes"] == t["boxes"][:, :1]).all()
            frames_equal = all(torch.equal(out[i], out[0]) for i in range(8))
            assert frames_equal == (not photometric)


def test_flip_is_exact(clips) -> None:
    frames, target = clips[1]
    cfg = DataConfig(
        min_size=48,
        max_size=64,
        multiscale=[48],
        crop_min=1000,
        crop_max=1000,
        hflip_prob=1.0,
        photometric=False,
    )
    out, t = build_transforms(cfg, train=True)(frames, target)
    expected = torch.from_numpy(frames).permute(0, 3, 1, 2).flip(-1).float() / 255
    torch.testing.assert_close(_denormalize(out), expected, atol=1e-5, rtol=0)
    assert torch.equal(t["masks"], target["masks"].flip(-1))
    flipped = target["boxes"].clone()
    flipped[..., 0] = 1 - flipped[..., 0]
    torch.testing.assert_close(t["boxes"], torch.where(target["valid"][..., None], flipped, 0.0))


def test_eval_transform_is_deterministic_resize_normalize() -> None:
    cfg = DataConfig(test_min_size=30, test_max_size=None)
    frames = np.full((3, 20, 50, 3), 200, dtype=np.uint8)
    frames[1] = 10
    out, target = build_transforms(cfg, train=False)(frames)
    assert target is None and out.shape == (3, 3, 30, 75)
    expected = (torch.tensor([200.0, 10.0, 200.0]) / 255)[:, None] - torch.tensor(MEAN)
    torch.testing.assert_close(out.mean(dim=(-1, -2)), expected / torch.tensor(STD), atol=1e-4, rtol=0)
    again, _ = build_transforms(cfg, train=False)(torch.from_numpy(frames).permute(0, 3, 1, 2))
    assert torch.equal(out, again)  # numpy [T,H,W,3] and torch [T,3,H,W] inputs agree
    raw, _ = build_transforms(cfg, train=False, normalize=False)(frames)  # preprocessing: keep uint8
    assert raw.dtype == torch.uint8 and raw.shape == out.shape
    assert raw[1].eq(10).all() and raw[0].eq(200).all()
    with pytest.raises(ValueError, match="uint8"):
        build_transforms(cfg, train=False)(frames.astype(np.float32))


def test_clip_without_instances(clips) -> None:
    frames, target = clips[0]
    empty = {
        **target,
        "masks": target["masks"][:0],
        "boxes": target["boxes"][:0],
        "valid": target["valid"][:0],
    }
    torch.manual_seed(0)
    out, t = build_transforms(load_config("tiny_cpu").data, train=True)(frames, empty)
    assert t["masks"].shape == (0, 5, *out.shape[-2:]) and t["boxes"].shape == (0, 5, 4)


def test_normalize_uint8_is_bitwise_torchvisions_todtype_and_normalize():
    """Inference normalises on the model's device with this function; training and the former
    inference path used torchvision's transforms: the two must give the same floats exactly."""
    from torchvision.transforms import v2

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 3, 17, 23), dtype=np.uint8))
    reference = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])(frames)
    ours = normalize_uint8(frames)
    assert ours.dtype == torch.float32 and torch.equal(ours, reference)
    assert frames.dtype == torch.uint8  # the input is not modified
