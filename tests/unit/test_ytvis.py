"""YouTube-VIS reader: mask round trip, segmentation formats, indexing, validation messages."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from vistr.data.synthetic import SynthSpec, render_video, video_annotations
from vistr.data.video_io import VideoDecodeError
from vistr.data.ytvis import YTVIS, AnnotationError, decode_segmentation, encode_mask, mask_bbox


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """Brute-force column-major run lengths, starting with a run of zeros."""
    flat = mask.T.reshape(-1).astype(int)
    counts, value, run = [], 0, 0
    for v in flat:
        if v == value:
            run += 1
        else:
            counts.append(run)
            value, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _tiny_dataset() -> dict[str, Any]:
    """Two videos of 3 frames (4x5): a normal track, a crowd track, a polygon track; 2021-style extras."""
    m = np.zeros((4, 5), dtype=bool)
    m[1:3, 2:4] = True
    return {
        "info": {"year": 2021},
        "licenses": [],
        "categories": [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}],
        "videos": [
            {
                "id": 10,
                "height": 4,
                "width": 5,
                "length": 3,
                "file_names": ["v/0.jpg", "v/1.jpg", "v/2.jpg"],
                "license": 1,
                "coco_url": "",
            },
            {"id": 11, "height": 4, "width": 5, "length": 3, "file_names": ["w/0.jpg", "w/1.jpg", "w/2.jpg"]},
        ],
        "annotations": [
            {
                "id": 1,
                "video_id": 10,
                "category_id": 7,
                "iscrowd": 0,
                "segmentations": [encode_mask(m), None, _uncompressed_rle(m)],
                "bboxes": [[2, 1, 2, 2], None, [2, 1, 2, 2]],
                "areas": [4, None, 4],
            },
            {
                "id": 2,
                "video_id": 10,
                "category_id": 1,
                "iscrowd": 1,
                "segmentations": [None, encode_mask(m), None],
                "bboxes": [None, [2, 1, 2, 2], None],
                "areas": [None, 4, None],
            },
            {
                "id": 3,
                "video_id": 11,
                "category_id": 7,
                "iscrowd": 0,
                "segmentations": [[[0, 0, 3, 0, 3, 2, 0, 2]], None, None],
            },
        ],
    }


def test_synthetic_gt_roundtrip_through_json() -> None:
    """Rendered masks -> compressed RLE -> JSON text -> reader -> identical masks."""
    spec = SynthSpec(size=(40, 56), frames=(7, 7), objects=(3, 3))
    video = render_video(np.random.default_rng(5), spec, index=1)
    anns = video_annotations(video, video_id=1, first_id=1)
    data = {
        "categories": [{"id": i} for i in range(1, 5)],
        "videos": [
            {"id": 1, "height": 40, "width": 56, "length": 7, "file_names": [f"v/{t}.jpg" for t in range(7)]}
        ],
        "annotations": anns,
    }
    ytvis = YTVIS(json.loads(json.dumps(data)))
    tracks = ytvis.tracks_of_video(1)
    kept = [m for m in video.masks if m.any()]
    assert len(tracks) == len(kept) >= 2
    for track, masks in zip(tracks, kept, strict=True):
        decoded = np.stack([decode_segmentation(s, 40, 56) for s in track.segmentations])
        np.testing.assert_array_equal(decoded, masks)
        assert [a is None for a in track.areas] == [not m.any() for m in masks]
        assert [a for a in track.areas if a is not None] == [int(m.sum()) for m in masks if m.any()]


def test_segmentation_formats() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((9, 13)) > 0.6
    np.testing.assert_array_equal(decode_segmentation(encode_mask(mask), 9, 13), mask)
    np.testing.assert_array_equal(decode_segmentation(_uncompressed_rle(mask), 9, 13), mask)
    assert not decode_segmentation(None, 9, 13).any()
    # Polygons: a multi-part polygon decodes to the union of its parts.
    a, b = [1, 1, 6, 1, 6, 4, 1, 4], [8, 5, 12, 5, 12, 8, 8, 8]
    union = decode_segmentation([a, b], 9, 13)
    np.testing.assert_array_equal(union, decode_segmentation([a], 9, 13) | decode_segmentation([b], 9, 13))
    assert decode_segmentation([a], 9, 13)[2:4, 2:6].all() and not union[:, 0].any()


def test_mask_bbox_matches_pycocotools() -> None:
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = np.zeros((20, 30), dtype=bool)
        y, x = rng.integers(0, 15), rng.integers(0, 25)
        mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
        expected = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))).tolist()
        assert mask_bbox(mask) == expected
    assert mask_bbox(np.zeros((3, 3), dtype=bool)) is None


def test_index_and_crowd() -> None:
    ytvis = YTVIS(_tiny_dataset())
    assert ytvis.video_ids == [10, 11]
    assert [t.id for t in ytvis.tracks_of_video(10)] == [1]
    assert [t.id for t in ytvis.tracks_of_video(10, include_crowd=True)] == [1, 2]
    assert ytvis.videos_of_category(7) == [10, 11] and ytvis.videos_of_category(1) == [10]
    assert ytvis.tracks_of_video(11)[0].bboxes is None and ytvis.videos[10].length == 3


def _load(tmp_path: Path, data: dict[str, Any], frames_root: Path | None = None) -> YTVIS:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return YTVIS.load(path, frames_root)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["videos"][0].pop("file_names"), r"broken.json: video 10: missing key 'file_names'"),
        (lambda d: d["annotations"][0].pop("segmentations"), r"annotation 1: missing key 'segmentations'"),
        (
            lambda d: d["annotations"][0]["segmentations"].pop(),
            r"video 10, annotation 1: segmentations has 2 entries but the video has 3 frames",
        ),
        (lambda d: d["annotations"][0]["bboxes"].append(None), r"annotation 1: bboxes has 4 entries"),
        (lambda d: d["annotations"][2].update(video_id=99), r"annotation 3: video_id 99 is not in 'videos'"),
        (lambda d: d["annotations"][2].update(category_id=3), r"annotation 3: category_id 3 is not in"),
        (
            lambda d: d["annotations"][0]["segmentations"][0].update(size=[5, 5]),
            r"annotation 1, frame 0: RLE size \[5, 5\] differs from the video size \[4, 5\]",
        ),
        (lambda d: d["videos"][1].update(length=4), r"video 11: has 3 file_names but length=4"),
        (lambda d: d.pop("categories"), r"top level: missing key 'categories'"),
        (lambda d: d.update(videos={}), r"top level: 'videos' must be a list"),
        (
            lambda d: d["annotations"].append(copy.deepcopy(d["annotations"][0])),
            r"annotation id 1 appears twice",
        ),
    ],
)
def test_malformed_annotations_name_file_entry_and_problem(tmp_path: Path, edit, message: str) -> None:
    data = _tiny_dataset()
    edit(data)
    with pytest.raises(AnnotationError, match=message):
        _load(tmp_path, data)


def test_not_json_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="bad.json: not valid JSON"):
        YTVIS.load(bad)
    with pytest.raises(AnnotationError, match="nope.json: annotation file does not exist"):
        YTVIS.load(tmp_path / "nope.json")


def test_missing_frame_file_and_corrupt_jpeg(synth_root: Path, tmp_path: Path) -> None:
    data = json.loads((synth_root / "annotations" / "instances_train_sub.json").read_text())
    frames = synth_root / "train" / "JPEGImages"
    ytvis = YTVIS(data, "train.json", frames)
    assert ytvis.load_frames(1, [0, 1, 0]).shape == (3, 48, 64, 3)

    data["videos"][1]["file_names"][2] = "train_0001/99999.jpg"
    with pytest.raises(
        AnnotationError, match=r"video 2: frame file .*train_0001/99999.jpg is missing on disk"
    ):
        YTVIS(data, "train.json", frames)

    # A copy of one video's frames with a truncated JPEG: the frame read names the file.
    video = data["videos"][0]
    copy_root = tmp_path / "frames"
    for name in video["file_names"]:
        (copy_root / name).parent.mkdir(parents=True, exist_ok=True)
        (copy_root / name).write_bytes((frames / name).read_bytes())
    broken = copy_root / video["file_names"][1]
    broken.write_bytes(broken.read_bytes()[:300])
    ytvis = YTVIS({**data, "videos": [video], "annotations": []}, "train.json", copy_root)
    with pytest.raises(VideoDecodeError, match=f"{broken}: corrupt or truncated"):
        ytvis.load_frames(1, [0, 1])
