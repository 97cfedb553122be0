"""`vistr preprocess` on real Ray clusters: exactness against the data layer, crash recovery,
bad source data, the manifest contract, and reading shards back (Ray and plain pyarrow).

One clean build of the shared synthetic dataset (``clean``) serves several tests; every other
build goes to its own directory. Each Ray Data execution costs a few seconds, so builds are few.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipelines.preprocess import FAIL_ENV, PreprocessError, run_preprocess
from pipelines.shards import (
    MANIFEST,
    ClipBatchCollate,
    ShardClipDataset,
    ShardError,
    file_sha256,
    iter_clips,
    open_shards,
    shard_files,
)
from vistr.config import load_config
from vistr.data.clips import clip_frame_ids, collate_clips, load_clip
from vistr.data.shards import preprocess_transform
from vistr.data.transforms import MEAN, STD, resized_size
from vistr.data.ytvis import YTVIS

pytestmark = pytest.mark.integration
SHARD_MB = 0.3  # ~1 video per shard on the 48x64 synthetic set: 6 train + 3 valid shards
SPLITS = {
    "train": ("annotations/instances_train_sub.json", "train"),
    "valid": ("annotations/instances_val_sub.json", "valid"),
}


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny_cpu")


@pytest.fixture(scope="module")
def clean(ray_local, synth_root, cfg, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("clean")
    return out, run_preprocess(cfg, synth_root, out, shard_mb=SHARD_MB)


def expected_clips(cfg, root: Path, split: str) -> dict[tuple, tuple[np.ndarray, dict]]:
    """Every clip of the split built directly by vistr.data.clips + the preprocessing resize."""
    ann, folder = SPLITS[split]
    ytvis = YTVIS.load(root / ann, root / folder / "JPEGImages")
    resize = preprocess_transform(cfg.data)
    out = {}
    for vid, video in ytvis.videos.items():
        for ids in clip_frame_ids(video.length, cfg.model.num_frames, cfg.data.clip_stride):
            frames, target = resize(*load_clip(ytvis, vid, ids))
            out[(vid, tuple(ids.tolist()))] = (frames.permute(0, 2, 3, 1).numpy(), target)
    return out


def stored_clips(out: Path, cfg, split: str) -> dict[tuple, tuple[np.ndarray, dict]]:
    clips = {}
    for frames, target in iter_clips(shard_files(out, cfg, split)):
        key = (target["video_id"], tuple(target["frame_ids"].tolist()))
        assert key not in clips, f"clip {key} stored twice"
        clips[key] = (frames, target)
    return clips


def assert_same_clips(got: dict, want: dict, pixel_tol: float | None = None) -> None:
    assert got.keys() == want.keys()
    for key, (frames, target) in want.items():
        got_frames, got_target = got[key]
        h, w = target["orig_size"]
        assert got_target["orig_size"] == (h, w)
        assert got_target["size"] == target["size"] == tuple(frames.shape[1:3])
        assert got_target["size"] == resized_size(h, w, 64, 96)  # tiny_cpu min/max size
        for name in ("frame_ids", "instance_ids", "labels", "boxes", "valid", "masks"):
            assert got_target[name].dtype == target[name].dtype, name
            assert torch.equal(got_target[name], target[name]), f"{key}: {name} differs"
        if pixel_tol is None:
            assert np.array_equal(got_frames, frames), f"{key}: frames differ"
        else:
            diff = np.abs(got_frames.astype(np.int16) - frames.astype(np.int16))
            assert diff.mean() < pixel_tol, f"{key}: mean pixel difference {diff.mean():.2f}"


def test_jpeg_shards_equal_data_layer_and_rerun_is_noop(clean, synth_root, cfg, capsys) -> None:
    out, manifest = clean
    for split in ("train", "valid"):
        assert_same_clips(stored_clips(out, cfg, split), expected_clips(cfg, synth_root, split))
    counts = manifest["counts"]
    assert counts["train"]["videos"] == 6 and counts["valid"]["videos"] == 3
    assert sum(s["rows"] for s in manifest["shards"]) == sum(c["clips"] for c in counts.values())
    assert all(file_sha256(out / s["file"]) == s["sha256"] for s in manifest["shards"])
    assert manifest["skipped"] == [] and manifest["schema_version"] == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST] + [s["file"] for s in manifest["shards"]]
    )
    capsys.readouterr()
    before = (out / MANIFEST).stat().st_mtime_ns
    assert run_preprocess(cfg, synth_root, out, shard_mb=SHARD_MB)["plan_hash"] == manifest["plan_hash"]
    assert "up to date" in capsys.readouterr().out and (out / MANIFEST).stat().st_mtime_ns == before
    with pytest.raises(ShardError, match="other inputs or settings"):  # other settings, same --out
        run_preprocess(cfg.with_overrides({"data.min_size": 72}), synth_root, out, shard_mb=SHARD_MB)


def test_mp4_source_matches_within_codec_tolerance(ray_local, synth_root, cfg, tmp_path) -> None:
    cfg2 = cfg.with_overrides({"data.clip_stride": 2})
    manifest = run_preprocess(
        cfg2, synth_root, tmp_path, splits=("train",), frames_from="videos", shard_mb=SHARD_MB
    )
    assert manifest["frames_from"] == "videos" and manifest["settings"]["clip_stride"] == 2
    # H.264 (crf 18, yuv420p) vs JPEG q95 of the same rendered frames.
    assert_same_clips(
        stored_clips(tmp_path, cfg2, "train"), expected_clips(cfg2, synth_root, "train"), pixel_tol=4.0
    )


def test_crash_then_resume_equals_clean_run(clean, synth_root, cfg, tmp_path, monkeypatch, capsys) -> None:
    clean_out, clean_manifest = clean
    monkeypatch.setenv(FAIL_ENV, "4")
    with pytest.raises(Exception, match=FAIL_ENV):
        run_preprocess(cfg, synth_root, tmp_path, shard_mb=SHARD_MB)
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(ShardError, match="no manifest.json"):
        shard_files(tmp_path, cfg, "train")
    survivors = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet")}
    assert 1 <= len(survivors) <= 4  # only plan positions < 4 may complete
    monkeypatch.delenv(FAIL_ENV)
    capsys.readouterr()
    manifest = run_preprocess(cfg, synth_root, tmp_path, shard_mb=SHARD_MB)
    assert (
        f"{len(survivors)} of 9 shards already complete; building {9 - len(survivors)}"
        in capsys.readouterr().out
    )
    assert {
        p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.parquet") if p.name in survivors
    } == survivors
    assert [(s["file"], s["sha256"], s["rows"]) for s in manifest["shards"]] == [
        (s["file"], s["sha256"], s["rows"]) for s in clean_manifest["shards"]
    ]
    assert not list(tmp_path.glob(".*tmp*"))  # the crashed shard's temporary file was cleaned up


@pytest.fixture(scope="module")
def broken_root(synth_root, tmp_path_factory) -> Path:
    """A copy of the dataset with a frame file missing (train video 2), a corrupt JPEG (video 3)
    and a truncated mp4 (video 5)."""
    root = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(synth_root, root)
    (root / "train/JPEGImages/train_0001/00002.jpg").unlink()
    jpeg = root / "train/JPEGImages/train_0002/00003.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    mp4 = root / "train/videos/train_0004.mp4"
    mp4.write_bytes(mp4.read_bytes()[: mp4.stat().st_size // 2])
    return root


@pytest.mark.parametrize(
    "frames_from, bad",
    [
        ("jpeg", {2: "train_0001/00002.jpg: frame file does not exist", 3: "train_0002/00003.jpg: corrupt"}),
        ("videos", {5: "train_0004.mp4: cannot open video"}),
    ],
)
def test_bad_source_fails_naming_video_then_skip_bad_records_it(
    ray_local, broken_root, cfg, tmp_path, frames_from, bad
) -> None:
    with pytest.raises(PreprocessError) as err:
        run_preprocess(
            cfg, broken_root, tmp_path, splits=("train",), frames_from=frames_from, shard_mb=SHARD_MB
        )
    message = str(err.value)
    assert f"{len(bad)} video(s) could not be read" in message and "--skip-bad" in message
    for video_id, reason in bad.items():  # every bad video is named, with its file, in one run
        assert re.search(rf"train video {video_id} \(.*{re.escape(reason)}", message), message
    assert not (tmp_path / MANIFEST).exists()
    assert len(list(tmp_path.glob("*.parquet"))) == 6 - len(bad)  # the good videos' shards are kept
    manifest = run_preprocess(
        cfg,
        broken_root,
        tmp_path,
        splits=("train",),
        frames_from=frames_from,
        shard_mb=SHARD_MB,
        skip_bad=True,
    )
    assert {s["video_id"]: s["reason"] for s in manifest["skipped"]}.keys() == bad.keys()
    assert all(bad[s["video_id"]] in s["reason"] for s in manifest["skipped"])
    counts = manifest["counts"]["train"]
    assert (counts["videos"], counts["shards"], counts["skipped_videos"]) == (6 - len(bad), 6, len(bad))
    stored = {target["video_id"] for _, target in iter_clips(shard_files(tmp_path, cfg, "train"))}
    assert stored == set(range(1, 7)) - bad.keys()


def test_cli_against_ray_head_gives_identical_shards(ray_head, clean, synth_root, tmp_path) -> None:
    _, clean_manifest = clean
    # fmt: off
    proc = ray_head.run([
        sys.executable, "-m", "vistr.cli", "preprocess", "--config", "tiny_cpu", "--src", str(synth_root),
        "--out", str(tmp_path), "--address", ray_head.address, "--splits", "train", "--shard-mb", str(SHARD_MB),
    ])
    # fmt: on
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [(s["file"], s["sha256"]) for s in manifest["shards"]] == [
        (s["file"], s["sha256"]) for s in clean_manifest["shards"] if s["split"] == "train"
    ]


def test_reader_refuses_mismatched_or_missing_manifest(clean, cfg, tmp_path) -> None:
    out, manifest = clean
    with pytest.raises(ShardError, match="num_frames: shards 6, config 8"):
        shard_files(out, cfg.with_overrides({"model.num_frames": 8}), "train")
    assert shard_files(
        out, cfg.with_overrides({"data.crop_min": 50}), "val"
    )  # augmentation is read-time only
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ShardError, match="schema_version 99"):
        shard_files(tmp_path, cfg, "train")
    with pytest.raises(ShardError, match="no manifest.json"):
        shard_files(tmp_path / "nowhere", cfg, "train")


def test_ray_dataset_batches_for_training_and_eval(clean, cfg) -> None:
    out, manifest = clean
    ds = open_shards(out, cfg, "train")
    plain = {
        (t["video_id"], tuple(t["frame_ids"].tolist())): f
        for f, t in iter_clips(shard_files(out, cfg, "train"))
    }
    seen = 0
    eval_collate = ClipBatchCollate(cfg, train=False)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for numpy_batch in ds.iter_batches(batch_size=4, batch_format="numpy"):
        batch = eval_collate(numpy_batch)
        for b, target in enumerate(batch["targets"]):
            h, w = target["size"]
            want = torch.from_numpy(plain[(target["video_id"], tuple(target["frame_ids"].tolist()))])
            want = (want.permute(0, 3, 1, 2).float() / 255 - mean) / std
            assert torch.allclose(batch["frames"][b, :, :, :h, :w], want, atol=1e-5)
            assert not batch["pad_mask"][b, :, :h, :w].any()
            seen += 1
    assert seen == manifest["counts"]["train"]["clips"]
    torch.manual_seed(0)
    train_batch = next(
        iter(ds.iter_torch_batches(batch_size=2, collate_fn=ClipBatchCollate(cfg, train=True)))
    )
    frames, targets = train_batch["frames"], train_batch["targets"]
    assert (
        frames.dtype == torch.float32
        and frames.shape[:3] == (2, cfg.model.num_frames, 3)
        and len(targets) == 2
    )
    for b, target in enumerate(targets):  # augmented: final size per the training rule, masks follow frames
        h, w = target["size"]
        assert target["masks"].shape[-2:] == (h, w) and min(h, w) <= cfg.data.max_size
        assert not train_batch["pad_mask"][b, :, :h, :w].any()


def test_plain_pytorch_reader_without_ray(clean, cfg) -> None:
    out, manifest = clean
    loader = DataLoader(ShardClipDataset(out, cfg, "val", train=True), batch_size=2, collate_fn=collate_clips)
    clips = 0
    for batch in loader:
        assert (
            batch["frames"].shape[1:3] == (cfg.model.num_frames, 3) and batch["frames"].dtype == torch.float32
        )
        for target in batch["targets"]:
            k = len(target["labels"])
            assert target["masks"].shape[:2] == (k, cfg.model.num_frames) and target["boxes"].shape == (
                k,
                cfg.model.num_frames,
                4,
            )
        clips += len(batch["targets"])
    assert clips == manifest["counts"]["valid"]["clips"]
