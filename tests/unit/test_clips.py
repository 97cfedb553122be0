"""Clip sampling (official formula), target building, the clip Dataset and collate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vistr.config import load_config
from vistr.data.clips import (
    ClipDataset,
    apply_time_order,
    build_target,
    clip_frame_ids,
    collate_clips,
    official_clip,
    permute_clip,
    random_start_clip,
)
from vistr.data.ytvis import YTVIS, Track, decode_segmentation, encode_mask


@pytest.mark.parametrize(
    "frame, num_frames, length, expected",
    [
        (5, 4, 10, [2, 3, 4, 5]),  # consecutive frames ending at f
        (1, 4, 10, [8, 9, 0, 1]),  # negative indices wrap to the video's end
        (0, 5, 3, [2, 0, 1, 2, 0]),  # L < T: offsets (4,3,2,1,0) mod 3 = (1,0,2,1,0)
        (2, 5, 3, [1, 2, 0, 1, 2]),
        (0, 3, 1, [0, 0, 0]),
    ],
)
def test_official_clip_hand_checked(frame: int, num_frames: int, length: int, expected: list[int]) -> None:
    assert official_clip(frame, num_frames, length).tolist() == expected


def test_official_clip_equals_python_indexing_formula() -> None:
    for length in range(1, 9):
        video = list(range(length))
        for num_frames in range(1, 10):
            for f in range(length):
                expected = [video[f - ((num_frames - 1 - j) % length)] for j in range(num_frames)]
                assert official_clip(f, num_frames, length).tolist() == expected
    with pytest.raises(ValueError, match="outside a video"):
        official_clip(5, 3, 5)


def test_random_start_and_stride_and_time_order() -> None:
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        ids = random_start_clip(10, 4, rng)
        assert np.array_equal(np.diff(ids), [1, 1, 1]) and 0 <= ids[0] <= 6
        starts.add(int(ids[0]))
    assert starts == set(range(7))
    assert random_start_clip(3, 7, rng).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert [c.tolist() for c in clip_frame_ids(5, 3, stride=2)] == [[3, 4, 0], [0, 1, 2], [2, 3, 4]]
    ids = np.arange(8)
    assert apply_time_order(ids, "in_order", rng) is ids
    shuffled = apply_time_order(ids, "random", rng)
    assert sorted(shuffled.tolist()) == ids.tolist() and shuffled.tolist() != ids.tolist()
    with pytest.raises(ValueError, match="time_order"):
        apply_time_order(ids, "backwards", rng)


def test_build_target_hand_made() -> None:
    h, w = 10, 20
    m = np.zeros((h, w), dtype=bool)
    m[2:6, 4:12] = True  # xywh (4, 2, 8, 4)
    tracks = [
        Track(
            5, 1, 3, False, (encode_mask(m), None, encode_mask(m)), ([4, 2, 8, 4], None, [16, 6, 8, 6]), None
        ),
        Track(6, 1, 2, True, (encode_mask(m),) * 3, ([4, 2, 8, 4],) * 3, None),  # crowd: excluded
        Track(7, 1, 1, False, (None, encode_mask(m), None), None, None),  # no bboxes: from the mask
    ]
    target = build_target(1, [2, 1, 0], tracks, h, w)
    assert target["instance_ids"].tolist() == [5, 7] and target["labels"].tolist() == [3, 1]
    assert target["frame_ids"].tolist() == [2, 1, 0] and target["orig_size"] == target["size"] == (h, w)
    assert target["valid"].tolist() == [[True, False, True], [False, True, False]]
    # Frame 2's box [16, 6, 8, 6] is clamped to x in [16, 20], y in [6, 10].
    expected = torch.tensor(
        [
            [[18 / 20, 8 / 10, 4 / 20, 4 / 10], [0, 0, 0, 0], [8 / 20, 4 / 10, 8 / 20, 4 / 10]],
            [[0, 0, 0, 0], [8 / 20, 4 / 10, 8 / 20, 4 / 10], [0, 0, 0, 0]],
        ]
    )
    torch.testing.assert_close(target["boxes"], expected)
    assert target["masks"].shape == (2, 3, h, w) and target["masks"].dtype == torch.bool
    assert torch.equal(target["masks"][0, 0], torch.from_numpy(m)) and not target["masks"][0, 1].any()
    empty = build_target(1, [0, 0], [], h, w)
    assert empty["boxes"].shape == (0, 2, 4) and empty["masks"].shape == (0, 2, h, w)


@pytest.fixture(scope="module")
def train_ytvis(synth_root: Path) -> YTVIS:
    return YTVIS.load(synth_root / "annotations/instances_train_sub.json", synth_root / "train/JPEGImages")


def test_dataset_items_and_untransformed_targets(train_ytvis: YTVIS) -> None:
    ds = ClipDataset(train_ytvis, num_frames=6)
    assert len(ds) == sum(v.length for v in train_ytvis.videos.values())
    for index in (0, len(ds) // 2, len(ds) - 1):
        frames, target = ds[index]
        video_id, frame = ds.items[index]
        video = train_ytvis.videos[video_id]
        assert target["frame_ids"].tolist() == official_clip(frame, 6, video.length).tolist()
        assert frames.shape == (6, 3, video.height, video.width) and frames.dtype == torch.uint8
        for k, track in enumerate(train_ytvis.tracks_of_video(video_id)):
            for j, f in enumerate(target["frame_ids"].tolist()):
                expected = decode_segmentation(track.segmentations[f], video.height, video.width)
                assert np.array_equal(target["masks"][k, j].numpy(), expected)
                assert bool(target["valid"][k, j]) == (track.segmentations[f] is not None)


def test_random_start_dataset_and_random_time_order(train_ytvis: YTVIS) -> None:
    ds = ClipDataset(train_ytvis, num_frames=4, sampling="random_start", time_order="random", seed=1)
    assert len(ds) == len(train_ytvis.videos)
    _, first = ds[0]
    _, again = ds[0]
    assert torch.equal(first["frame_ids"], again["frame_ids"])  # reproducible per (seed, epoch, index)
    epochs = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        epochs.add(tuple(ds.clip(0)[1].tolist()))
    assert len(epochs) > 1
    # Targets follow the shuffled frame order.
    _, t = ds[0]
    for j, f in enumerate(t["frame_ids"].tolist()):
        ref = build_target(1, [f], train_ytvis.tracks_of_video(1), 48, 64)
        assert torch.equal(t["masks"][:, j], ref["masks"][:, 0]) and torch.equal(
            t["boxes"][:, j], ref["boxes"][:, 0]
        )


def test_from_config_with_transforms(synth_root: Path) -> None:
    cfg = load_config("tiny_cpu")
    train = ClipDataset.from_config(cfg, "train", root=synth_root)
    frames, target = train[3]
    again, _ = train[3]
    assert torch.equal(frames, again)  # augmentation seeded per item
    assert frames.dtype == torch.float32 and frames.shape[:2] == (cfg.model.num_frames, 3)
    assert target["size"] == tuple(frames.shape[-2:]) and target["masks"].shape[-2:] == frames.shape[-2:]
    val = ClipDataset.from_config(cfg, "val", root=synth_root)
    frames, target = val[0]
    assert target["size"] == (64, 85)  # shorter side 64 (test_min_size), 48x64 -> 64x85 (int truncation)
    with pytest.raises(ValueError, match="split"):
        ClipDataset.from_config(cfg, "test", root=synth_root)


def test_collate_pads_bottom_right() -> None:
    a = torch.rand(3, 3, 4, 5)
    b = torch.rand(3, 3, 6, 2)
    batch = collate_clips([(a, {"id": 0}), (b, {"id": 1})])
    frames, pad_mask, targets = batch["frames"], batch["pad_mask"], batch["targets"]
    assert frames.shape == (2, 3, 3, 6, 5) and pad_mask.shape == (2, 3, 6, 5)
    assert torch.equal(frames[0, :, :, :4, :5], a) and torch.equal(frames[1, :, :, :6, :2], b)
    assert frames[0, :, :, 4:].abs().sum() == 0 and frames[1, :, :, :, 2:].abs().sum() == 0
    assert pad_mask[0, :, 4:].all() and not pad_mask[0, :, :4, :5].any()
    assert pad_mask[1, :, :, 2:].all() and not pad_mask[1, :, :, :2].any()
    assert [t["id"] for t in targets] == [0, 1]
    with pytest.raises(ValueError, match="same number of frames"):
        collate_clips([(a, {}), (torch.rand(2, 3, 4, 5), {})])


def test_synthetic_json_is_read_by_dataset(synth_root: Path) -> None:
    data = json.loads((synth_root / "annotations/instances_val_sub.json").read_text())
    ytvis = YTVIS.load(synth_root / "annotations/instances_val_sub.json", synth_root / "valid/JPEGImages")
    assert len(ytvis.tracks) == len(data["annotations"]) > 0


def test_permute_clip_moves_frames_and_every_per_frame_target_together() -> None:
    t, k = 5, 2
    frames = np.stack([np.full((4, 6, 3), 10 * i, np.uint8) for i in range(t)])  # frame i is all 10·i
    masks = torch.zeros(k, t, 4, 6, dtype=torch.bool)
    for i in range(t):
        masks[0, i, 0, : i + 1] = True  # frame i: i+1 pixels of instance 0
    target = {"frame_ids": torch.arange(100, 100 + t), "labels": torch.tensor([3, 4]),
              "boxes": torch.arange(k * t * 4, dtype=torch.float32).view(k, t, 4),
              "valid": torch.tensor([[True] * t, [False, True, False, True, False]]), "masks": masks}  # fmt: skip
    order = np.array([3, 0, 4, 1, 2])
    moved_frames, moved = permute_clip(frames, target, order)
    for new, old in enumerate(order):
        assert moved_frames[new, 0, 0, 0] == 10 * old and moved["frame_ids"][new] == 100 + old
        assert int(moved["masks"][0, new].sum()) == old + 1
        assert torch.equal(moved["boxes"][:, new], target["boxes"][:, old])
        assert torch.equal(moved["valid"][:, new], target["valid"][:, old])
    assert torch.equal(moved["labels"], target["labels"])  # per-instance entries stay
