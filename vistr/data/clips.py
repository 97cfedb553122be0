"""Clips: which frames form a training clip, the clip's target, a Dataset and a collate function.

``build_target`` is the single place where annotations become a clip target; the training
Dataset and the Ray preprocessing stage (which decodes frames itself) both call it, so the two
paths cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from vistr.config import Config
from vistr.data.transforms import ClipTransform, build_transforms
from vistr.data.ytvis import YTVIS, Track, decode_segmentation, mask_bbox

SAMPLINGS = ("official", "random_start")
TIME_ORDERS = ("in_order", "random")


def official_clip(frame: int, num_frames: int, length: int) -> np.ndarray:
    """Frames ``f - ((T-1-j) mod L)`` for j = 0..T-1, negative indices wrapped as Python does.

    For L >= T: the T consecutive frames ending at ``frame`` (wrapping to the video's end near
    its start); for L < T the offsets cycle, so short videos repeat (FACTS.md §d).
    """
    if not 0 <= frame < length:
        raise ValueError(f"frame {frame} outside a video of length {length}")
    j = np.arange(num_frames)
    return (frame - (num_frames - 1 - j) % length) % length


def random_start_clip(length: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """T consecutive frames from a uniformly random start; a short video is cycled 0..L-1,0,1,..."""
    start = int(rng.integers(0, max(length - num_frames, 0) + 1))
    return (start + np.arange(num_frames)) % length


def clip_frame_ids(length: int, num_frames: int, stride: int = 1) -> list[np.ndarray]:
    """The deterministic clips of one video for preprocessing: official clips ending at frames
    0, stride, 2·stride, ... (stride 1 = exactly the official training items)."""
    return [official_clip(f, num_frames, length) for f in range(0, length, stride)]


def apply_time_order(frame_ids: np.ndarray, time_order: str, rng: np.random.Generator) -> np.ndarray:
    """Paper Table 1c: ``random`` shuffles the frames of the clip (targets follow the frames)."""
    if time_order not in TIME_ORDERS:
        raise ValueError(f"time_order={time_order!r}; expected one of {TIME_ORDERS}")
    return rng.permutation(frame_ids) if time_order == "random" else frame_ids


def permute_clip(frames: np.ndarray, target: dict, order: np.ndarray) -> tuple[np.ndarray, dict]:
    """A decoded clip with its frames in ``order``: frames and every per-frame target entry move
    together (Table 1c "random" time order for clips stored in time order, e.g. in the shards)."""
    index = torch.as_tensor(order, dtype=torch.long)
    moved = dict(target, frame_ids=target["frame_ids"][index], boxes=target["boxes"][:, index],
                 valid=target["valid"][:, index], masks=target["masks"][:, index])  # fmt: skip
    return frames[order], moved


def build_target(
    video_id: int, frame_ids: Sequence[int], tracks: Sequence[Track], height: int, width: int
) -> dict[str, Any]:
    """The clip target of FACTS.md §d, one entry per (non-crowd) track of the video.

    Every track is kept, even one absent from all the clip's frames (as the official code does;
    its frames are simply not ``valid``). Boxes come from the annotation's bboxes (xywh, clamped to
    the image), or from the mask when the file has no bboxes; they are normalized cx,cy,w,h
    w.r.t. (height, width) and zero where not valid.
    """
    frame_ids = np.asarray(frame_ids, dtype=np.int64)
    tracks = [t for t in tracks if not t.iscrowd]
    k, t_len = len(tracks), len(frame_ids)
    masks = np.zeros((k, t_len, height, width), dtype=bool)
    boxes = np.zeros((k, t_len, 4), dtype=np.float32)
    valid = np.zeros((k, t_len), dtype=bool)
    for i, track in enumerate(tracks):
        decoded: dict[int, np.ndarray] = {}
        for j, f in enumerate(frame_ids.tolist()):
            if f not in decoded:
                decoded[f] = decode_segmentation(track.segmentations[f], height, width)
            masks[i, j] = decoded[f]
            box = track.bboxes[f] if track.bboxes is not None else mask_bbox(decoded[f])
            if box is None:
                continue
            x, y, w, h = box
            x0, x1 = np.clip([x, x + w], 0, width)
            y0, y1 = np.clip([y, y + h], 0, height)
            boxes[i, j] = [
                (x0 + x1) / 2 / width,
                (y0 + y1) / 2 / height,
                (x1 - x0) / width,
                (y1 - y0) / height,
            ]
            valid[i, j] = True
    return {
        "video_id": int(video_id),
        "frame_ids": torch.from_numpy(frame_ids),
        "instance_ids": torch.tensor([tr.id for tr in tracks], dtype=torch.int64),
        "labels": torch.tensor([tr.category_id for tr in tracks], dtype=torch.int64),
        "boxes": torch.from_numpy(boxes),
        "valid": torch.from_numpy(valid),
        "masks": torch.from_numpy(masks),
        "orig_size": (int(height), int(width)),
        "size": (int(height), int(width)),
    }


def load_clip(ytvis: YTVIS, video_id: int, frame_ids: Sequence[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Decoded frames uint8 [T,H,W,3] and the untransformed target of one clip."""
    video = ytvis.videos[video_id]
    frames = ytvis.load_frames(video_id, frame_ids)
    return frames, build_target(
        video_id, frame_ids, ytvis.tracks_of_video(video_id), video.height, video.width
    )


class ClipDataset(Dataset):
    """Training/validation clips of a YouTube-VIS split for single-process (or DataLoader) use.

    ``official`` sampling has one item per (video, frame), as the official dataset;
    ``random_start`` has one item per video with a fresh window each epoch. All randomness of an
    item (window, time order, augmentation) is seeded by (seed, epoch, index), so an item is
    reproducible whatever worker loads it; call ``set_epoch`` to vary it across epochs.
    """

    def __init__(
        self,
        ytvis: YTVIS,
        num_frames: int,
        transform: ClipTransform | None = None,
        sampling: str = "official",
        time_order: str = "in_order",
        seed: int = 0,
    ) -> None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r}; expected one of {SAMPLINGS}")
        if time_order not in TIME_ORDERS:
            raise ValueError(f"time_order={time_order!r}; expected one of {TIME_ORDERS}")
        self.ytvis, self.num_frames, self.transform = ytvis, num_frames, transform
        self.sampling, self.time_order, self.seed, self.epoch = sampling, time_order, seed, 0
        if sampling == "official":
            self.items = [(vid, f) for vid, v in ytvis.videos.items() for f in range(v.length)]
        else:
            self.items = [(vid, -1) for vid in ytvis.videos]

    @classmethod
    def from_config(cls, cfg: Config, split: str = "train", root: str | Path | None = None) -> ClipDataset:
        """The split ("train" or "val") of ``cfg.data`` (root overrides ``cfg.data.root``)."""
        data = cfg.data
        root = Path(root if root is not None else data.root or ".")
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; expected 'train' or 'val'")
        train = split == "train"
        ytvis = YTVIS.load(
            root / (data.train_ann if train else data.val_ann),
            root / (data.train_frames if train else data.val_frames),
        )
        return cls(
            ytvis,
            cfg.model.num_frames,
            build_transforms(data, train=train),
            sampling=data.sampling if train else "official",
            time_order=data.time_order if train else "in_order",
            seed=cfg.train.seed,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def clip(self, index: int) -> tuple[int, np.ndarray]:
        """(video_id, frame_ids) of item ``index`` for the current epoch."""
        video_id, frame = self.items[index]
        length = self.ytvis.videos[video_id].length
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.sampling == "official":
            ids = official_clip(frame, self.num_frames, length)
        else:
            ids = random_start_clip(length, self.num_frames, rng)
        return video_id, apply_time_order(ids, self.time_order, rng)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        video_id, frame_ids = self.clip(index)
        frames, target = load_clip(self.ytvis, video_id, frame_ids)
        if self.transform is None:
            return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(
                int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            )
            return self.transform(frames, target)


def collate_clips(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> dict[str, Any]:
    """Stack clips to [B,T,3,H,W], padding bottom/right to the batch max with zeros.

    Returns the engine's batch ``{"frames", "pad_mask" [B,T,H,W] True on padding, "targets"}``.
    Targets stay at their own (unpadded) size; their boxes are normalized w.r.t. that size, as in DETR.
    """
    frames = [clip for clip, _ in batch]
    num_frames = {f.shape[0] for f in frames}
    if len(num_frames) != 1:
        raise ValueError(f"clips in a batch must have the same number of frames, got {sorted(num_frames)}")
    height = max(f.shape[-2] for f in frames)
    width = max(f.shape[-1] for f in frames)
    t_len, channels = frames[0].shape[:2]
    out = frames[0].new_zeros((len(frames), t_len, channels, height, width))
    pad_mask = torch.ones((len(frames), t_len, height, width), dtype=torch.bool)
    for b, f in enumerate(frames):
        out[b, :, :, : f.shape[-2], : f.shape[-1]] = f
        pad_mask[b, :, : f.shape[-2], : f.shape[-1]] = False
    return {"frames": out, "pad_mask": pad_mask, "targets": [target for _, target in batch]}
