"""A synthetic YouTube-VIS-format dataset: `vistr synth --out DIR ...`.

The point is a dataset that needs the same skills as the real one, at a size a tiny model can
learn on a CPU in minutes: the category is only visible in the *shape* (every instance gets a
random colour), identity must be tracked through motion, bounces, scale change, occlusion (z-order:
the visible mask excludes what is in front) and objects that enter or leave mid-video (null
segmentations there), and a video can hold several instances of one category. Generation is a
pure function of the seed: the same seed gives byte-identical JSON and identical JPEGs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vistr.data.ytvis import encode_mask, mask_bbox

SHAPES = ("circle", "square", "triangle", "cross")  # category id = index + 1


@dataclass(frozen=True)
class SynthSpec:
    num_videos: int = 8  # train split
    num_val_videos: int = 4
    frames: tuple[int, int] = (6, 12)  # frames per video, inclusive range
    size: tuple[int, int] = (64, 64)  # (H, W)
    objects: tuple[int, int] = (1, 3)  # instances per video, inclusive range
    num_categories: int = 4
    seed: int = 0
    video_files: bool = False  # also write DIR/{split}/videos/<video>.mp4
    fps: float = 10.0


@dataclass
class SynthVideo:
    """One rendered video: frames and the *visible* mask of every instance (z-order applied)."""

    frames: np.ndarray  # uint8 [L, H, W, 3]
    masks: np.ndarray  # bool [N, L, H, W]; all False where the instance is absent or hidden
    categories: list[int]  # raw category id per instance
    amodal: np.ndarray  # bool [N, L, H, W]: whole shapes before occlusion (instance order = z-order)


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` rotated by ``angle`` (a circle is a 32-gon)."""
    if shape == "cross":  # a plus sign with arms 2*0.38 wide, scaled so its corners lie on r
        arm = 0.38
        pts = [(1, arm), (arm, arm), (arm, 1), (-arm, 1), (-arm, arm), (-1, arm)]
        pts = np.array(pts + [(-x, -y) for x, y in pts]) / np.hypot(1, arm)
    elif shape in ("circle", "square", "triangle"):
        n = {"circle": 32, "square": 4, "triangle": 3}[shape]
        k = 2 * np.pi * np.arange(n) / n
        pts = np.stack([np.cos(k), np.sin(k)], 1)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _raster(polygon: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Textured background: smooth colour noise plus a faint random grating (float [H,W,3])."""
    # Muted colours (grey plus a small tint) so the objects' random colours usually stand out.
    coarse = (rng.uniform(60, 190, size=(4, 4, 1)) + rng.uniform(-30, 30, size=(4, 4, 3))).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    freq, theta = rng.uniform(0.15, 0.5), rng.uniform(0, np.pi)
    grating = 18 * np.sin(freq * (xx * np.cos(theta) + yy * np.sin(theta)))
    grain = rng.normal(0, 6, size=(height, width, 1))
    return smooth + grating[..., None] + grain


def _appearance(rng: np.random.Generator, length: int, enter: bool, leave: bool) -> tuple[int, int]:
    """[start, end) frames in which an instance is in the scene (at least 2 frames)."""
    start = int(rng.integers(1, max(2, length // 2))) if enter and length >= 4 else 0
    end = (
        int(rng.integers(max(start + 2, length // 2 + 1), length))
        if leave and length - start >= 4
        else length
    )
    return start, end


def render_video(rng: np.random.Generator, spec: SynthSpec, index: int) -> SynthVideo:
    """Render one video. ``index`` forces variety: every 3rd video repeats a category, every
    odd one has an instance entering late and one leaving early."""
    height, width = spec.size
    length = int(rng.integers(spec.frames[0], spec.frames[1] + 1))
    n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    duplicate = index % 3 == 0 and spec.objects[1] >= 2
    n = max(n, 2) if duplicate else n
    categories = [int(c) for c in rng.integers(1, spec.num_categories + 1, size=n)]
    if duplicate:
        categories[1] = categories[0]
    short = min(height, width)
    frames = np.repeat(_background(rng, height, width)[None], length, axis=0)
    full = np.zeros((n, length, height, width), dtype=bool)
    yy, xx = np.mgrid[0:height, 0:width]
    texture = 1 + 0.12 * np.sin(0.5 * (xx + yy))  # mild shading so objects are not flat colour
    for i, cat in enumerate(categories):
        forced_enter, forced_leave = index % 2 == 1 and i == 0, index % 2 == 1 and i == n - 1
        start, end = _appearance(
            rng, length, forced_enter or rng.random() < 0.3, forced_leave or rng.random() < 0.3
        )
        radius = rng.uniform(0.09, 0.15) * short  # diameter 18-30% of the shorter side
        colour = rng.uniform(0, 255, size=3)
        pos = rng.uniform(radius, [width - radius, height - radius])
        heading = rng.uniform(0, 2 * np.pi)
        vel = rng.uniform(0.02, 0.06) * short * np.array([np.cos(heading), np.sin(heading)])
        angle, spin = rng.uniform(0, 2 * np.pi), rng.uniform(-0.2, 0.2)
        pulse, phase = rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)
        for t in range(length):
            r = radius * (1 + pulse * np.sin(0.6 * t + phase))
            if start <= t < end:
                mask = full[i, t] = _raster(shape_polygon(SHAPES[cat - 1], *pos, r, angle), height, width)
                frames[t][mask] = colour * texture[mask][:, None]
            pos, angle = pos + vel, angle + spin
            for axis, limit in ((0, width), (1, height)):  # bounce off the frame edges
                if pos[axis] < r or pos[axis] > limit - r:
                    vel[axis] = -vel[axis]
                    pos[axis] = np.clip(pos[axis], r, limit - r)
    # z-order = instance order: a later instance hides the earlier ones where they overlap.
    in_front = np.flip(np.logical_or.accumulate(np.flip(full, 0), axis=0), 0)
    visible = full.copy()
    visible[:-1] &= ~in_front[1:]
    return SynthVideo(np.clip(frames, 0, 255).astype(np.uint8), visible, categories, full)


def video_annotations(video: SynthVideo, video_id: int, first_id: int) -> list[dict[str, Any]]:
    """YouTube-VIS annotations (compressed RLE) of a rendered video; never-visible tracks dropped."""
    height, width = video.frames.shape[1:3]
    out = []
    for masks, cat in zip(video.masks, video.categories, strict=True):
        if not masks.any():
            continue
        segs, boxes, areas = [], [], []
        for mask in masks:
            box = mask_bbox(mask)
            segs.append(encode_mask(mask) if box is not None else None)
            boxes.append(box)
            areas.append(int(mask.sum()) if box is not None else None)
        out.append(
            {
                "id": first_id + len(out),
                "video_id": video_id,
                "category_id": cat,
                "iscrowd": 0,
                "height": height,
                "width": width,
                "segmentations": segs,
                "bboxes": boxes,
                "areas": areas,
            }
        )
    return out


def generate_split(
    out: Path, split: str, count: int, spec: SynthSpec, progress: bool = True
) -> dict[str, Any]:
    """Write one split's frames (and optional mp4s); return its annotation JSON object."""
    from tqdm import tqdm

    split_dir = "train" if split == "train" else "valid"
    videos: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for v in tqdm(range(count), desc=f"synth {split}", disable=not progress, unit="video"):
        rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, v])
        video = render_video(rng, spec, v)
        name = f"{split_dir}_{v:04d}"
        folder = out / split_dir / "JPEGImages" / name
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for t, frame in enumerate(video.frames):
            names.append(f"{name}/{t:05d}.jpg")
            # quality 95 without chroma subsampling: pixels stay close to the masks.
            Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95, subsampling=0)
        if spec.video_files:
            from vistr.data.video_io import write_video

            write_video(out / split_dir / "videos" / f"{name}.mp4", video.frames, spec.fps)
        height, width = spec.size
        videos.append(
            {"id": v + 1, "width": width, "height": height, "length": len(names), "file_names": names}
        )
        annotations += video_annotations(video, v + 1, len(annotations) + 1)
    return {
        "info": {"description": "vistr synthetic YouTube-VIS-format dataset", "spec": asdict(spec)},
        "categories": [
            {"id": i + 1, "name": SHAPES[i], "supercategory": "shape"} for i in range(spec.num_categories)
        ],
        "videos": videos,
        "annotations": annotations,
    }


def generate_dataset(out: str | Path, spec: SynthSpec, progress: bool = True) -> dict[str, Path]:
    """Both splits, with ground truth, in DataConfig's default layout; returns the JSON paths."""
    if not 1 <= spec.num_categories <= len(SHAPES):
        raise ValueError(f"num_categories must be 1..{len(SHAPES)}, got {spec.num_categories}")
    if spec.num_videos < 1 or spec.num_val_videos < 1:
        raise ValueError(f"both splits need >= 1 video, got {spec.num_videos} / {spec.num_val_videos}")
    out = Path(out)
    paths = {}
    for split, count, file in (
        ("train", spec.num_videos, "instances_train_sub.json"),
        ("val", spec.num_val_videos, "instances_val_sub.json"),
    ):
        data = generate_split(out, split, count, spec, progress)
        paths[split] = out / "annotations" / file
        paths[split].parent.mkdir(parents=True, exist_ok=True)
        paths[split].write_text(json.dumps(data, sort_keys=True, separators=(",", ":")))
    return paths


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    try:
        bounds = (int(lo), int(hi or lo))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or A-B, got {text!r}") from exc
    if bounds[0] < 1 or bounds[1] < bounds[0]:
        raise argparse.ArgumentTypeError(f"expected 1 <= A <= B, got {text!r}")
    return bounds


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.lower().partition("x")
    try:
        size = (int(h), int(w))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 64x64), got {text!r}") from exc
    if min(size) < 16:
        raise argparse.ArgumentTypeError(f"frames must be at least 16x16, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = SynthSpec()
    parser.add_argument("--out", required=True, type=Path, help="output dataset directory")
    parser.add_argument("--videos", type=int, default=d.num_videos, help="training videos")
    parser.add_argument("--val-videos", type=int, default=d.num_val_videos, help="validation videos")
    parser.add_argument(
        "--frames", type=_range, default=d.frames, help="frames per video: N or A-B (default 6-12)"
    )
    parser.add_argument("--size", type=_size, default=d.size, help="frame size HxW (default 64x64)")
    parser.add_argument("--objects", type=_range, default=d.objects, help="instances per video: N or A-B")
    parser.add_argument("--categories", type=int, default=d.num_categories, help=f"1..{len(SHAPES)} shapes")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--video-files", action="store_true", help="also write an mp4 per video")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    spec = SynthSpec(
        num_videos=args.videos,
        num_val_videos=args.val_videos,
        frames=args.frames,
        size=args.size,
        objects=args.objects,
        num_categories=args.categories,
        seed=args.seed,
        video_files=args.video_files,
    )
    paths = generate_dataset(args.out, spec, progress=not args.quiet)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0
