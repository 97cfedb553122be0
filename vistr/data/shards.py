"""The clip-shard row codec (DESIGN.md §3): one Parquet row = one clip of T frames.

Pure numpy/torch, no Ray and no Arrow, so the writer (``pipelines/preprocess.py``), the Ray reader
and the plain single-process reader (``pipelines/shards.py``) share one definition of a row and
cannot drift apart. A row is a dict of numpy values; ``decode_clip`` turns it back into exactly the
``(frames, target)`` pair that ``vistr.data.clips`` builds (after the preprocessing resize), so the
training transforms and ``collate_clips`` work on shard rows unchanged.

Masks are the bulk of a target, and they are binary: they are stored bit-packed per
instance-frame (``np.packbits`` of the H·W pixels), 8x smaller than bool.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vistr.config import DataConfig
from vistr.data.clips import build_target, clip_frame_ids
from vistr.data.shard_settings import SCHEMA_VERSION
from vistr.data.transforms import ClipTransform, build_transforms
from vistr.data.video_io import VideoDecodeError, read_frames
from vistr.data.ytvis import YTVIS, AnnotationError

# Column order of a shard file (and of the dict ``encode_clip`` returns).
COLUMNS = (
    "video_id",  # int64
    "clip_index",  # int32: position of the clip among its video's clips (anchor frame = index * stride)
    "clip_start",  # int32: first frame of the clip (frame_ids[0]; frame_ids may wrap around)
    "frame_ids",  # int32 [T]
    "frames",  # uint8 [T, H, W, 3] at the preprocessing resolution
    "orig_size",  # int32 [2] (H, W) of the source video
    "size",  # int32 [2] (H, W) of the stored frames and masks
    "instance_ids",  # int32 [K] annotation (track) ids
    "labels",  # int64 [K] raw category ids
    "boxes",  # float32 [K, T, 4] normalized cx, cy, w, h; 0 where not valid
    "valid",  # bool [K, T]
    "masks",  # uint8 [K, T, ceil(H*W/8)]: np.packbits of each instance-frame mask
    "split",  # str
    "schema_version",  # int32
)


class ShardSchemaError(ValueError):
    """A shard row, file or manifest does not match what this code reads; the message says why."""


def preprocess_transform(data: DataConfig) -> ClipTransform:
    """The deterministic resize to the training resolution that preprocessing applies.

    It is the data layer's own non-augmenting training transform (official resize rule; masks
    nearest, boxes recomputed as in training), keeping uint8 frames for storage.
    """
    return build_transforms(dataclasses.replace(data, augment=False), train=True, normalize=False)


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool [K, T, H, W] -> uint8 [K, T, ceil(H*W/8)] (row-major pixels, big-endian bits)."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 4:
        raise ValueError(f"masks must be [K, T, H, W], got shape {masks.shape}")
    k, t, h, w = masks.shape
    return np.packbits(masks.reshape(k, t, h * w), axis=-1)


def unpack_masks(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of ``pack_masks``; checks the byte count so a wrong ``size`` cannot go unnoticed."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.ndim != 3 or packed.shape[-1] != (height * width + 7) // 8:
        raise ShardSchemaError(
            f"packed masks of shape {packed.shape} do not hold {height}x{width} masks "
            f"(expected [K, T, {(height * width + 7) // 8}])"
        )
    k, t = packed.shape[:2]
    return np.unpackbits(packed, axis=-1, count=height * width).astype(bool).reshape(k, t, height, width)


def encode_clip(frames: np.ndarray, target: dict[str, Any], clip_index: int, split: str) -> dict[str, Any]:
    """A shard row from frames (uint8 [T,H,W,3]) and a ``build_target``-style target."""
    frames_np = np.ascontiguousarray(frames)
    if frames_np.dtype != np.uint8 or frames_np.ndim != 4 or frames_np.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames_np.dtype} {frames_np.shape}")
    size = tuple(int(v) for v in target["size"])
    if frames_np.shape[1:3] != size:
        raise ValueError(f"frames are {frames_np.shape[1:3]} but target size is {size}")
    frame_ids = np.asarray(target["frame_ids"], dtype=np.int32)
    return {
        "video_id": int(target["video_id"]),
        "clip_index": int(clip_index),
        "clip_start": int(frame_ids[0]),
        "frame_ids": frame_ids,
        "frames": frames_np,
        "orig_size": np.asarray(target["orig_size"], dtype=np.int32),
        "size": np.asarray(size, dtype=np.int32),
        "instance_ids": np.asarray(target["instance_ids"], dtype=np.int32),
        "labels": np.asarray(target["labels"], dtype=np.int64),
        "boxes": np.asarray(target["boxes"], dtype=np.float32),
        "valid": np.asarray(target["valid"], dtype=bool),
        "masks": pack_masks(np.asarray(target["masks"])),
        "split": str(split),
        "schema_version": SCHEMA_VERSION,
    }


def check_schema_version(version: Any, where: str = "shard row") -> None:
    """Refuse data written by another schema version (decoding it would be silently wrong)."""
    if version is None or int(version) != SCHEMA_VERSION:
        raise ShardSchemaError(
            f"{where}: schema_version {version} but this code reads version {SCHEMA_VERSION}; "
            "re-run `vistr preprocess` with this version of vistr"
        )


def decode_clip(row: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(frames uint8 [T,H,W,3], target)`` of a row, the target as ``build_target`` returns it."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
        raise ShardSchemaError(f"shard row lacks column(s) {', '.join(missing)}")
    check_schema_version(row["schema_version"])
    height, width = (int(v) for v in np.asarray(row["size"]))
    frames = np.asarray(row["frames"], dtype=np.uint8)
    boxes = np.asarray(row["boxes"], dtype=np.float32)
    k, t = boxes.shape[:2] if boxes.ndim == 3 else (0, len(row["frame_ids"]))
    target = {
        "video_id": int(row["video_id"]),
        "frame_ids": torch.as_tensor(np.asarray(row["frame_ids"], dtype=np.int64)),
        "instance_ids": torch.as_tensor(np.asarray(row["instance_ids"], dtype=np.int64)),
        "labels": torch.as_tensor(np.asarray(row["labels"], dtype=np.int64)),
        "boxes": torch.as_tensor(boxes.reshape(k, t, 4)),
        "valid": torch.as_tensor(np.asarray(row["valid"], dtype=bool).reshape(k, t)),
        "masks": torch.as_tensor(unpack_masks(_packed(row["masks"], k, t, height, width), height, width)),
        "orig_size": tuple(int(v) for v in np.asarray(row["orig_size"])),
        "size": (height, width),
    }
    return frames, target


def _packed(masks: Any, k: int, t: int, height: int, width: int) -> np.ndarray:
    """Packed masks as [K, T, bytes]; an empty (K=0) array may come back from storage flattened."""
    masks = np.asarray(masks, dtype=np.uint8)
    return masks.reshape(k, t, (height * width + 7) // 8) if masks.size == 0 else masks


class StageTimer(dict):
    """Seconds spent per named stage, summed: ``with timer("decode"): ...``."""

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[stage] = self.get(stage, 0.0) + time.perf_counter() - start


def read_annotated_video(path: str | Path, height: int, width: int, length: int) -> np.ndarray:
    """uint8 [L,H,W,3] from a video file holding exactly the annotated frames, one per file_name."""
    frames = read_frames(path)
    if len(frames) != length:
        raise VideoDecodeError(
            f"{path}: {len(frames)} frames decoded but the annotation lists {length}; a video file "
            "used as the frame source must hold exactly the annotated frames"
        )
    if frames.shape[1:3] == (height + height % 2, width + width % 2):  # H.264 writers pad to even sizes
        return frames[:, :height, :width]
    if frames.shape[1:3] != (height, width):
        raise AnnotationError(
            f"{path}: frames are {frames.shape[1:3]} but the annotation says {(height, width)}"
        )
    return frames


def video_clip_rows(
    ytvis: YTVIS,
    video_id: int,
    split: str,
    settings: dict[str, Any],
    video_file: str | Path | None = None,
    timer: StageTimer | None = None,
) -> list[dict[str, Any]]:
    """Every clip row of one video (``clip_frame_ids`` order), frames from its JPEG folder or
    from ``video_file``.

    Each frame is decoded, and each mask decoded and resized, once per video rather than once
    per clip containing it (T times with stride 1). This equals the per-clip path
    ``preprocess_transform(load_clip(...))`` exactly because every step is per frame.
    """
    timer = timer if timer is not None else StageTimer()
    video = ytvis.videos[video_id]
    every = np.arange(video.length)
    with timer("decode"):
        if video_file is not None:
            frames = read_annotated_video(video_file, video.height, video.width, video.length)
        else:
            frames = ytvis.load_frames(video_id, every)
    with timer("targets"):
        target = build_target(video_id, every, ytvis.tracks_of_video(video_id), video.height, video.width)
    with timer("resize"):
        data = DataConfig(min_size=settings["min_size"], max_size=settings["max_size"])
        frames, target = preprocess_transform(data)(frames, target)
        frames = frames.permute(0, 2, 3, 1).numpy()  # back to the stored [L, H, W, 3]
    rows = []
    with timer("encode"):
        clips = clip_frame_ids(video.length, settings["num_frames"], settings["clip_stride"])
        for i, ids in enumerate(clips):
            index = torch.from_numpy(ids)
            clip = {**target, "frame_ids": index.long()}
            clip.update({k: target[k][:, index] for k in ("masks", "boxes", "valid")})
            rows.append(encode_clip(frames[ids], clip, i, split))
    return rows
