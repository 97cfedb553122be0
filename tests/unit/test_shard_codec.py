"""The clip-shard row codec: mask bit-packing, row encode/decode, schema version, settings hash,
and the Arrow/Parquet round trip of rows (pyarrow + Ray's tensor types; no Ray cluster)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.shards import (
    arrow_batch_to_numpy,
    batch_rows,
    open_shard_writer,
    read_shard_metadata,
    rows_to_table,
    set_shard_metadata,
)
from vistr.config import load_config
from vistr.data.clips import build_target, clip_frame_ids, load_clip
from vistr.data.shard_settings import SCHEMA_VERSION, preprocess_settings, settings_hash
from vistr.data.shards import (
    COLUMNS,
    ShardSchemaError,
    check_schema_version,
    decode_clip,
    encode_clip,
    pack_masks,
    preprocess_transform,
    read_annotated_video,
    unpack_masks,
    video_clip_rows,
)
from vistr.data.video_io import VideoDecodeError
from vistr.data.ytvis import YTVIS, Track, encode_mask


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 8, 8), (0, 4, 6, 6), (3, 2, 1, 1)])
def test_pack_unpack_round_trip(shape: tuple[int, ...]) -> None:
    masks = np.random.default_rng(0).random(shape) < 0.4
    packed = pack_masks(masks)
    h, w = shape[2:]
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:2], (h * w + 7) // 8)
    assert np.array_equal(unpack_masks(packed, h, w), masks)


def test_pack_layout_is_row_major_big_endian_bits() -> None:
    mask = np.zeros((1, 1, 3, 3), dtype=bool)
    mask[0, 0, 0, 0] = mask[0, 0, 2, 2] = True  # pixels 0 and 8 of 9
    assert pack_masks(mask).tolist() == [[[0b10000000, 0b10000000]]]
    with pytest.raises(ShardSchemaError, match="do not hold 5x5 masks"):
        unpack_masks(pack_masks(mask), 5, 5)  # 25 pixels need 4 bytes, not 2
    with pytest.raises(ValueError, match=r"\[K, T, H, W\]"):
        pack_masks(mask[0])


def _clip(num_instances: int = 2) -> tuple[np.ndarray, dict]:
    h, w = 9, 13
    m = np.zeros((h, w), dtype=bool)
    m[2:7, 3:11] = True
    tracks = [
        Track(
            11, 4, 2, False, (encode_mask(m), None, encode_mask(m)), ([3, 2, 8, 5], None, [3, 2, 8, 5]), None
        ),
        Track(12, 4, 3, False, (None, encode_mask(~m), None), None, None),
    ][:num_instances]
    frames = np.random.default_rng(1).integers(0, 256, (3, h, w, 3), dtype=np.uint8)
    return frames, build_target(4, [2, 1, 0], tracks, h, w)


@pytest.mark.parametrize("num_instances", [2, 0])
def test_encode_decode_round_trip_is_exact(num_instances: int) -> None:
    frames, target = _clip(num_instances)
    row = encode_clip(frames, target, clip_index=5, split="train")
    assert tuple(row) == COLUMNS and row["schema_version"] == SCHEMA_VERSION
    assert row["frame_ids"].dtype == np.int32 and row["instance_ids"].dtype == np.int32
    assert row["masks"].shape == (num_instances, 3, (9 * 13 + 7) // 8) and row["clip_start"] == 2
    got_frames, got = decode_clip(row)
    assert np.array_equal(got_frames, frames)
    assert got.keys() == target.keys()
    for key, value in target.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


def test_schema_version_and_missing_columns_are_refused() -> None:
    row = encode_clip(*_clip(), clip_index=0, split="valid")
    check_schema_version(SCHEMA_VERSION)
    with pytest.raises(
        ShardSchemaError, match=f"schema_version 0 but this code reads version {SCHEMA_VERSION}"
    ):
        decode_clip({**row, "schema_version": 0})
    with pytest.raises(ShardSchemaError, match="lacks column"):
        decode_clip({k: v for k, v in row.items() if k != "masks"})
    with pytest.raises(ValueError, match="target size"):
        encode_clip(np.zeros((3, 4, 4, 3), np.uint8), _clip()[1], 0, "train")


def test_settings_hash_tracks_only_what_changes_shards() -> None:
    cfg = load_config("tiny_cpu")
    base = settings_hash(preprocess_settings(cfg))
    assert base == settings_hash(preprocess_settings(load_config("tiny_cpu")))
    assert (
        settings_hash(preprocess_settings(cfg.with_overrides({"data.crop_min": 40, "train.lr": 1.0}))) == base
    )
    for key, value in [
        ("model.num_frames", 7),
        ("data.min_size", 70),
        ("data.max_size", 100),
        ("data.clip_stride", 2),
    ]:
        assert settings_hash(preprocess_settings(cfg.with_overrides({key: value}))) != base, key


def _write(path, tables: list, meta: dict) -> None:
    writer = open_shard_writer(path)
    for table in tables:
        writer.write_table(table)
    set_shard_metadata(writer, meta)
    writer.close()


def test_parquet_round_trip_of_rows(tmp_path) -> None:
    rows = [encode_clip(*_clip(k), clip_index=i, split="train") for i, k in enumerate((2, 0, 1))]
    path = tmp_path / "s.parquet"
    _write(path, [rows_to_table(rows[:2]), rows_to_table(rows[2:])], {"rows": 3, "skipped": []})
    assert read_shard_metadata(path) == {"rows": 3, "skipped": []}
    group = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {group.column(i).path_in_schema: group.column(i).encodings for i in range(group.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["frames.data.list.element"]  # uint8 stored as INT32: split bytes
    back = list(batch_rows(arrow_batch_to_numpy(pq.read_table(path))))
    assert len(back) == 3
    for row, got in zip(rows, back, strict=True):
        want_frames, want = decode_clip(row)
        got_frames, got_target = decode_clip(got)
        assert np.array_equal(got_frames, want_frames)
        assert all(
            torch.equal(got_target[k], want[k]) for k in ("masks", "boxes", "valid", "labels", "frame_ids")
        )
    empty = tmp_path / "empty.parquet"  # a shard whose videos were all skipped still has the schema
    _write(empty, [], {"rows": 0})
    assert pq.read_table(empty).schema.names == list(COLUMNS) and pq.read_table(empty).num_rows == 0
    assert read_shard_metadata(empty) == {"rows": 0}


def test_video_rows_equal_per_clip_data_layer_path(synth_root) -> None:
    """Decoding/resizing once per video then slicing == load_clip + resize per clip, bit for bit."""
    cfg = load_config("tiny_cpu", {"data.clip_stride": 2})
    ytvis = YTVIS.load(synth_root / "annotations/instances_train_sub.json", synth_root / "train/JPEGImages")
    vid = next(v for v in ytvis.videos if len(ytvis.tracks_of_video(v)) >= 2)
    length = ytvis.videos[vid].length
    rows = video_clip_rows(ytvis, vid, "train", preprocess_settings(cfg))
    clips = clip_frame_ids(length, cfg.model.num_frames, 2)
    assert len(rows) == len(clips) == (length + 1) // 2
    resize = preprocess_transform(cfg.data)
    for i, (row, ids) in enumerate(zip(rows, clips, strict=True)):
        frames, target = resize(*load_clip(ytvis, vid, ids))
        got_frames, got = decode_clip(row)
        assert row["clip_index"] == i and row["split"] == "train"
        assert np.array_equal(got_frames, frames.permute(0, 2, 3, 1).numpy())
        assert got["size"] == target["size"] and got["orig_size"] == target["orig_size"]
        for key in ("frame_ids", "instance_ids", "labels", "boxes", "valid", "masks"):
            assert torch.equal(got[key], target[key]), key


def test_video_file_must_hold_the_annotated_frames(synth_root) -> None:
    mp4 = synth_root / "train/videos/train_0000.mp4"
    ytvis = YTVIS.load(synth_root / "annotations/instances_train_sub.json")
    video = ytvis.videos[1]
    assert read_annotated_video(mp4, video.height, video.width, video.length).shape == (
        video.length, video.height, video.width, 3,
    )  # fmt: skip
    with pytest.raises(
        VideoDecodeError, match=f"train_0000.mp4: {video.length} frames decoded but the annotation"
    ):
        read_annotated_video(mp4, video.height, video.width, video.length + 1)
