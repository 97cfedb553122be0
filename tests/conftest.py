"""Shared fixtures: a small synthetic YouTube-VIS dataset (generated once per session) and ffmpeg."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vistr.data.synthetic import SynthSpec, generate_dataset

SMALL_SPEC = SynthSpec(num_videos=6, num_val_videos=3, frames=(5, 9), size=(48, 64), seed=3, video_files=True)


@pytest.fixture(scope="session")
def synth_spec() -> SynthSpec:
    """The spec ``synth_root`` was generated with (6 train / 3 val videos of 5-9 frames, 48x64)."""
    return SMALL_SPEC


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR with train/valid frames, mp4 copies and both annotation files (read-only by convention)."""
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root, SMALL_SPEC, progress=False)
    return root


@pytest.fixture(scope="session")
def ffmpeg() -> str:
    """Path of the ffmpeg CLI; its absence is a failure (the video tests must not skip silently)."""
    path = shutil.which("ffmpeg")
    if path is None:
        pytest.fail(
            "ffmpeg is not installed: install it (e.g. `apt-get install ffmpeg`) to run the video IO tests"
        )
    return path
