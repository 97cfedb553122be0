"""`vistr predict` as a user runs it: a subprocess on real files (FFmpeg's own testsrc mp4, a frame
folder), checked through the files it writes; bad inputs fail with one line and no traceback."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vistr.checkpoint import save_checkpoint
from vistr.config import load_config
from vistr.data.video_io import iter_frames, probe
from vistr.evaluation import validate_results
from vistr.models import build_model
from vistr.predict import load_model_file

pytestmark = pytest.mark.integration
FRAMES = 17  # > 2 windows of tiny_cpu's T = 6, not a multiple of the stride


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random-weight tiny_cpu model saved as our checkpoint and as an official-layout file."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cfg = load_config("tiny_cpu")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    model = build_model(cfg)
    ours = save_checkpoint(root / "tiny.pt", model, config=cfg)
    official = root / "tiny_official.pth"
    # Official files have the official (FrozenBatchNorm) backbone; names only, no config: detected by keys.
    frozen = build_model(cfg.with_overrides({"model.backbone_norm": "frozen_bn"}))
    torch.save({"model": frozen.state_dict()}, official)
    return {"ours": ours, "official": official}


@pytest.fixture(scope="module")
def testsrc(tmp_path_factory: pytest.TempPathFactory, ffmpeg: str) -> Path:
    path = tmp_path_factory.mktemp("video") / "testsrc.mp4"
    subprocess.run([ffmpeg, "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=96x64:rate=12",
                    "-frames:v", str(FRAMES), "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def _predict(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vistr.cli", "predict", *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=300)


def _gt_for(length: int, height: int, width: int) -> dict:
    """Ground truth of one video: what the results must be valid against (format only)."""
    return {"videos": [{"id": 1, "height": height, "width": width, "length": length,
                        "file_names": [f"{i:05d}.jpg" for i in range(length)]}],
            "categories": [{"id": i, "name": str(i)} for i in range(6)], "annotations": []}  # every logit id


def _check_outputs(out: Path, source: Path) -> list[dict]:
    info, overlay = probe(source), probe(out / "overlay.mp4")
    assert overlay.num_frames == info.num_frames == sum(1 for _ in iter_frames(out / "overlay.mp4"))
    assert overlay.fps == pytest.approx(info.fps)
    results = json.loads((out / "results.json").read_text())
    validate_results(_gt_for(info.num_frames, info.height, info.width), results)
    assert results and all(r["video_id"] == 1 and len(r["segmentations"]) == info.num_frames for r in results)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 0 and sheet.size[1] > 0
    return results


def test_predict_on_an_ffmpeg_testsrc_video(tiny_model, testsrc, tmp_path):
    proc = _predict(testsrc, "--model", tiny_model["ours"], "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = _check_outputs(tmp_path, testsrc)
    assert "results.json" in proc.stdout
    # --top-k and --score-threshold filter the same predictions
    proc = _predict(testsrc, "--model", tiny_model["ours"], "--out", tmp_path / "k", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    top = json.loads((tmp_path / "k" / "results.json").read_text())
    assert [r["score"] for r in top] == sorted((r["score"] for r in results), reverse=True)[:2]


def test_predict_on_a_frame_folder(tiny_model, testsrc, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(iter_frames(testsrc)):
        Image.fromarray(frame).save(folder / f"{i:05d}.png")
    proc = _predict(folder, "--model", tiny_model["ours"], "--out", tmp_path / "out", "--overlap", "3")
    assert proc.returncode == 0, proc.stderr
    _check_outputs(tmp_path / "out", folder)


def test_official_checkpoint_is_detected_and_loads(tiny_model, testsrc, tmp_path):
    proc = _predict(testsrc, "--model", tiny_model["official"], "--window", "6", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    _check_outputs(tmp_path, testsrc)
    # the architecture read from the official file's shapes is tiny_cpu's, and every weight matches
    model, cfg = load_model_file(tiny_model["official"], num_frames=6)
    tiny = load_config("tiny_cpu").model
    for key in ("backbone", "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward", "num_classes",
                "mask_dims", "seq_head_dim", "num_frames", "num_slots"):
        assert getattr(cfg.model, key) == getattr(tiny, key), key
    assert cfg.data.test_min_size == 300  # official inference resize for official files
    reference = torch.load(tiny_model["official"])["model"]
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if k in reference)


def _assert_clean_failure(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("vistr predict: error:") and all(w in lines[0] for w in words), lines[0]


def test_bad_inputs_fail_with_one_clear_line(tiny_model, testsrc, tmp_path):
    data = testsrc.read_bytes()
    for name, cut in (("head.mp4", len(data) // 2), ("tail.mp4", len(data) - 600)):
        (tmp_path / name).write_bytes(data[:cut])
        _assert_clean_failure(_predict(tmp_path / name, "--model", tiny_model["ours"], "--out", tmp_path / name),
                              name)
        assert not (tmp_path / name / "overlay.mp4").exists()  # no half-written result left behind
    _assert_clean_failure(_predict(tmp_path / "missing.mp4", "--model", tiny_model["ours"]), "missing.mp4",
                          "does not exist")
    _assert_clean_failure(_predict(testsrc, "--model", testsrc, "--out", tmp_path / "o"), "testsrc.mp4",
                          "checkpoint")
    _assert_clean_failure(_predict(testsrc, "--model", tiny_model["official"]), "--window")
    np.testing.assert_equal(probe(testsrc).num_frames, FRAMES)  # the fixture itself was fine
