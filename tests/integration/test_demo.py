"""`vistr demo` as a user runs it (a subprocess on its own local Ray cluster), at a small scale:
it must end with a registered champion and an overlay video frame-for-frame as long as its input,
and a second run must reuse every workflow step."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from vistr.data.video_io import probe

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_ends_with_a_champion_and_a_full_length_overlay(tmp_path) -> None:
    out = tmp_path / "demo"
    args = [sys.executable, "-m", "vistr.cli", "demo", "--out", str(out), "--minutes", "0.2", "--videos", "6",
            "--val-videos", "2", "--workers", "1"]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("vistr", "champion")
    assert champion.tags["promotion.decision"] == "promoted"
    assert f"champion: vistr version {champion.version}" in first.stdout
    source = sorted((out / "data" / "valid" / "videos").glob("*.mp4"))[0]
    overlay = probe(out / "predict" / "overlay.mp4")
    assert overlay.num_frames == probe(source).num_frames > 0
    assert overlay.fps == pytest.approx(probe(source).fps)
    assert (out / "predict" / "contact_sheet.png").stat().st_size > 0

    second = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(re.findall(r"^\s+reused \(run", second.stdout, re.M)) == 5, second.stdout
