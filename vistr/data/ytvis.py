"""YouTube-VIS (2019 / 2021) annotation files: load, validate, index, decode masks.

A YouTube-VIS annotation is one instance *track*: per-frame lists ``segmentations`` (RLE,
compressed or not, polygons, or null where the instance is absent), ``bboxes`` (xywh or null)
and ``areas``. The file is validated completely on load, so a malformed entry fails at once with
the file, the video/annotation id and what is wrong, instead of as a KeyError in a data-loader
worker hours into training.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from vistr.data.video_io import read_image

Segmentation = dict[str, Any] | list[list[float]] | None


class AnnotationError(ValueError):
    """A YouTube-VIS annotation file is malformed; the message names the file, entry and problem."""


@dataclass(frozen=True)
class Video:
    id: int
    height: int
    width: int
    file_names: tuple[str, ...]  # relative to the split's frame root, one per frame

    @property
    def length(self) -> int:
        return len(self.file_names)


@dataclass(frozen=True)
class Track:
    """One annotation = one instance over the whole video (lists have one entry per frame)."""

    id: int
    video_id: int
    category_id: int
    iscrowd: bool
    segmentations: tuple[Segmentation, ...]
    bboxes: tuple[list[float] | None, ...] | None  # None when the file has no "bboxes"
    areas: tuple[float | None, ...] | None


def decode_segmentation(seg: Segmentation, height: int, width: int) -> np.ndarray:
    """A bool [H, W] mask from an RLE (compressed or not) or polygons; null gives all False."""
    if seg is None:
        return np.zeros((height, width), dtype=bool)
    if isinstance(seg, list):  # polygons: one RLE per part, union of the parts
        rles = mask_utils.frPyObjects(seg, height, width)
        return mask_utils.decode(rles).any(axis=2) if rles else np.zeros((height, width), dtype=bool)
    if isinstance(seg["counts"], list):  # uncompressed RLE
        seg = mask_utils.frPyObjects(seg, height, width)
    return mask_utils.decode(seg).astype(bool)


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Compressed RLE of a [H, W] mask, JSON-ready (``counts`` as str), as YouTube-VIS stores it."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("utf-8")
    return rle


def mask_bbox(mask: np.ndarray) -> list[float] | None:
    """xywh box (pixel-edge convention, as pycocotools' toBbox) of a mask; None if empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if rows.size == 0:
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


class YTVIS:
    """An indexed, validated YouTube-VIS annotation file (plus, optionally, its frame folder)."""

    def __init__(
        self,
        data: dict[str, Any],
        source: str = "<dict>",
        frames_root: str | Path | None = None,
        check_files: bool = True,
    ) -> None:
        self.source = source
        self.frames_root = Path(frames_root) if frames_root is not None else None
        check = _Validator(source)
        check.top(data)
        self.categories: dict[int, dict[str, Any]] = {int(c["id"]): c for c in data["categories"]}
        self.videos: dict[int, Video] = {}
        for raw in data["videos"]:
            video = check.video(raw)
            if video.id in self.videos:
                raise AnnotationError(f"{source}: video id {video.id} appears twice")
            self.videos[video.id] = video
        self.tracks: dict[int, Track] = {}
        self._by_video: dict[int, list[int]] = defaultdict(list)
        self._by_category: dict[int, set[int]] = defaultdict(set)
        for raw in data.get("annotations") or []:
            track = check.track(raw, self.videos, self.categories)
            if track.id in self.tracks:
                raise AnnotationError(f"{source}: annotation id {track.id} appears twice")
            self.tracks[track.id] = track
            self._by_video[track.video_id].append(track.id)
            self._by_category[track.category_id].add(track.video_id)
        if self.frames_root is not None and check_files:
            self._check_frame_files()

    @classmethod
    def load(
        cls, ann_file: str | Path, frames_root: str | Path | None = None, check_files: bool = True
    ) -> YTVIS:
        ann_file = Path(ann_file)
        try:
            data = json.loads(ann_file.read_text())
        except FileNotFoundError as exc:
            raise AnnotationError(f"{ann_file}: annotation file does not exist") from exc
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{ann_file}: not valid JSON ({exc})") from exc
        return cls(data, str(ann_file), frames_root, check_files)

    @property
    def video_ids(self) -> list[int]:
        return list(self.videos)

    def tracks_of_video(self, video_id: int, include_crowd: bool = False) -> list[Track]:
        """The video's tracks in file order (= instance order of the official targets)."""
        tracks = [self.tracks[i] for i in self._by_video.get(video_id, [])]
        return tracks if include_crowd else [t for t in tracks if not t.iscrowd]

    def videos_of_category(self, category_id: int) -> list[int]:
        return sorted(self._by_category.get(category_id, ()))

    def frame_path(self, video_id: int, index: int) -> Path:
        if self.frames_root is None:
            raise ValueError(f"{self.source}: no frames_root given, cannot locate frame files")
        return self.frames_root / self.videos[video_id].file_names[index]

    def load_frames(self, video_id: int, frame_ids: list[int] | np.ndarray) -> np.ndarray:
        """uint8 [T, H, W, 3] frames (repeated ids are decoded once)."""
        cache: dict[int, np.ndarray] = {}
        for i in frame_ids:
            if int(i) not in cache:
                cache[int(i)] = read_image(self.frame_path(video_id, int(i)))
        video = self.videos[video_id]
        frames = np.stack([cache[int(i)] for i in frame_ids])
        if frames.shape[1:3] != (video.height, video.width):
            raise AnnotationError(
                f"{self.source}: video {video_id}: frames are {frames.shape[1]}x{frames.shape[2]} but the "
                f"annotation says height={video.height} width={video.width}"
            )
        return frames

    def _check_frame_files(self) -> None:
        missing = [
            (vid, name)
            for vid, video in self.videos.items()
            for name in video.file_names
            if not (self.frames_root / name).is_file()
        ]
        if missing:
            vid, name = missing[0]
            raise AnnotationError(
                f"{self.source}: video {vid}: frame file {self.frames_root / name} is missing on disk "
                f"({len(missing)} missing frame file(s) in all); check data.root / the frames folder"
            )


class _Validator:
    """Checks one entry at a time and raises AnnotationError with its location."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> AnnotationError:
        return AnnotationError(f"{self.source}: {where}: {what}")

    def require(self, raw: Any, keys: tuple[str, ...], where: str) -> None:
        if not isinstance(raw, dict):
            raise self.fail(where, f"expected an object, got {type(raw).__name__}")
        for key in keys:
            if key not in raw:
                raise self.fail(where, f"missing key {key!r}")

    def top(self, data: Any) -> None:
        self.require(data, ("videos", "categories"), "top level")
        for key in ("videos", "categories"):
            if not isinstance(data[key], list):
                raise self.fail("top level", f"{key!r} must be a list, got {type(data[key]).__name__}")
        for i, cat in enumerate(data["categories"]):
            self.require(cat, ("id",), f"categories[{i}]")

    def video(self, raw: Any) -> Video:
        self.require(raw, ("id",), "video entry")
        where = f"video {raw['id']}"
        self.require(raw, ("height", "width", "file_names"), where)
        names = raw["file_names"]
        length = raw.get("length", len(names))
        if len(names) != length:
            raise self.fail(where, f"has {len(names)} file_names but length={length}")
        return Video(int(raw["id"]), int(raw["height"]), int(raw["width"]), tuple(names))

    def track(self, raw: Any, videos: dict[int, Video], categories: dict[int, Any]) -> Track:
        self.require(raw, ("id",), "annotation entry")
        where = f"annotation {raw['id']}"
        self.require(raw, ("video_id", "category_id", "segmentations"), where)
        video = videos.get(int(raw["video_id"]))
        if video is None:
            raise self.fail(where, f"video_id {raw['video_id']} is not in 'videos'")
        where = f"video {video.id}, annotation {raw['id']}"
        if int(raw["category_id"]) not in categories:
            raise self.fail(where, f"category_id {raw['category_id']} is not in 'categories'")
        per_frame = {k: raw.get(k) for k in ("segmentations", "bboxes", "areas") if raw.get(k) is not None}
        for key, values in per_frame.items():
            if not isinstance(values, list) or len(values) != video.length:
                n = len(values) if isinstance(values, list) else type(values).__name__
                raise self.fail(where, f"{key} has {n} entries but the video has {video.length} frames")
        for t, seg in enumerate(raw["segmentations"]):
            self.segmentation(seg, video, f"{where}, frame {t}")
        for t, box in enumerate(per_frame.get("bboxes", [])):
            if box is not None and (not isinstance(box, list) or len(box) != 4):
                raise self.fail(f"{where}, frame {t}", f"bbox must be [x, y, w, h] or null, got {box!r}")
        return Track(
            id=int(raw["id"]),
            video_id=video.id,
            category_id=int(raw["category_id"]),
            iscrowd=bool(raw.get("iscrowd", 0)),
            segmentations=tuple(raw["segmentations"]),
            bboxes=tuple(per_frame["bboxes"]) if "bboxes" in per_frame else None,
            areas=tuple(per_frame["areas"]) if "areas" in per_frame else None,
        )

    def segmentation(self, seg: Any, video: Video, where: str) -> None:
        if seg is None:
            return
        if isinstance(seg, list):
            if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg):
                raise self.fail(where, "polygon segmentation must be lists of >= 3 (x, y) pairs")
            return
        self.require(seg, ("size", "counts"), where + " segmentation")
        if list(seg["size"]) != [video.height, video.width]:
            raise self.fail(
                where, f"RLE size {seg['size']} differs from the video size [{video.height}, {video.width}]"
            )
