"""Synthetic dataset: layout, determinism, and the difficulty features asserted on the JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from vistr.data import synthetic
from vistr.data.synthetic import SHAPES, SynthSpec, generate_dataset, render_video
from vistr.data.video_io import probe, read_image
from vistr.data.ytvis import YTVIS, decode_segmentation


def _json(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}_sub.json").read_text())


def test_layout_and_both_splits_have_ground_truth(synth_root: Path, synth_spec: SynthSpec) -> None:
    for split, frames_dir, count in (
        ("train", "train", synth_spec.num_videos),
        ("val", "valid", synth_spec.num_val_videos),
    ):
        data = _json(synth_root, split)
        assert len(data["videos"]) == count and data["annotations"]
        assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4]
        ytvis = YTVIS.load(
            synth_root / "annotations" / f"instances_{split}_sub.json", synth_root / frames_dir / "JPEGImages"
        )
        for video in data["videos"]:
            assert synth_spec.frames[0] <= video["length"] <= synth_spec.frames[1]
            name = video["file_names"][0].split("/")[0]
            assert probe(synth_root / frames_dir / "videos" / f"{name}.mp4").num_frames == video["length"]
            assert ytvis.load_frames(video["id"], [0]).shape == (1, 48, 64, 3)
        for ann in data["annotations"]:
            assert 1 <= ann["category_id"] <= 4 and ann["iscrowd"] == 0
            for seg, box, area in zip(ann["segmentations"], ann["bboxes"], ann["areas"], strict=True):
                assert (seg is None) == (box is None) == (area is None)
                if seg is not None:
                    assert isinstance(seg["counts"], str)  # compressed RLE
                    assert int(decode_segmentation(seg, 48, 64).sum()) == area > 0


def test_entering_leaving_and_same_category_instances(synth_root: Path) -> None:
    data = _json(synth_root, "train")
    presence = [[s is not None for s in a["segmentations"]] for a in data["annotations"]]
    entering = [p for p in presence if not p[0] and any(p)]
    leaving = [p for p in presence if p[0] and not p[-1]]
    assert entering and leaving
    cats_per_video: dict[int, list[int]] = {}
    for ann in data["annotations"]:
        cats_per_video.setdefault(ann["video_id"], []).append(ann["category_id"])
    assert any(len(c) != len(set(c)) for c in cats_per_video.values())
    # Object size: mean visible area is roughly 15-30% of the frame side squared (shape-dependent).
    areas = [a for ann in data["annotations"] for a in ann["areas"] if a]
    side = np.sqrt(np.mean(areas)) / 48
    assert 0.1 < side < 0.35


def test_occlusion_visible_masks_are_disjoint_and_pixels_follow_masks() -> None:
    spec = SynthSpec(size=(64, 64), frames=(12, 12), objects=(3, 3))
    occluded = 0
    for index in range(6):
        video = render_video(np.random.default_rng([9, index]), spec, index)
        assert (video.masks.sum(0) <= 1).all()  # the visible masks never overlap
        for i in range(len(video.categories)):  # visible = own shape minus every shape in front
            in_front = video.amodal[i + 1 :].any(0)
            np.testing.assert_array_equal(video.masks[i], video.amodal[i] & ~in_front)
            occluded += int((video.amodal[i] & in_front).any(axis=(1, 2)).sum())
        # Each instance has one colour (up to the mild texture): inside-mask pixels are far from the
        # background they replaced, i.e. frames and masks agree.
        for masks in video.masks:
            for t in np.flatnonzero(masks.any((1, 2))):
                inside = video.frames[t][masks[t]].astype(float)
                assert inside.std(0).max() < 40
    assert occluded > 0  # some instance-frames really are partly hidden


def test_deterministic_by_seed(tmp_path: Path) -> None:
    spec = SynthSpec(num_videos=2, num_val_videos=1, seed=11)
    generate_dataset(tmp_path / "a", spec, progress=False)
    generate_dataset(tmp_path / "b", spec, progress=False)
    generate_dataset(tmp_path / "c", SynthSpec(num_videos=2, num_val_videos=1, seed=12), progress=False)
    for split in ("train", "val"):
        a = (tmp_path / "a/annotations" / f"instances_{split}_sub.json").read_bytes()
        assert a == (tmp_path / "b/annotations" / f"instances_{split}_sub.json").read_bytes()
        assert a != (tmp_path / "c/annotations" / f"instances_{split}_sub.json").read_bytes()
    jpegs = sorted((tmp_path / "a").rglob("*.jpg"))
    assert jpegs
    for path in jpegs:
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()


def test_shapes_differ_and_all_categories_appear() -> None:
    spec = SynthSpec()
    seen = set()
    for index in range(12):
        seen.update(render_video(np.random.default_rng([0, index]), spec, index).categories)
    assert seen == set(range(1, len(SHAPES) + 1))
    rasters = [synthetic._raster(synthetic.shape_polygon(s, 32, 32, 14, 0.3), 64, 64) for s in SHAPES]
    areas = [int(r.sum()) for r in rasters]
    # circle > square > triangle; a cross differs from all; all centred in the frame
    assert areas[0] > areas[1] > areas[2] and len(set(areas)) == 4
    assert all(abs(np.argwhere(r).mean(0) - 32).max() < 3 for r in rasters)


def test_cli_arguments(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(
        [
            "--out",
            str(tmp_path / "d"),
            "--videos",
            "2",
            "--val-videos",
            "1",
            "--frames",
            "5",
            "--size",
            "32x48",
            "--seed",
            "4",
            "--categories",
            "2",
            "--quiet",
        ]
    )
    assert synthetic.run(args) == 0
    data = _json(tmp_path / "d", "train")
    assert [v["length"] for v in data["videos"]] == [5, 5] and len(data["categories"]) == 2
    assert {a["category_id"] for a in data["annotations"]} <= {1, 2}
    frame = read_image(tmp_path / "d/train/JPEGImages" / data["videos"][0]["file_names"][0])
    assert frame.shape == (32, 48, 3)
    assert not (tmp_path / "d/train/videos").exists()
    with pytest.raises(ValueError, match="both splits need"):
        generate_dataset(tmp_path / "e", SynthSpec(num_val_videos=0), progress=False)
    for bad in (["--size", "32"], ["--frames", "5-3"], ["--size", "8x8"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--out", "x", *bad])
