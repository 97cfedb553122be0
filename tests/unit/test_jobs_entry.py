"""jobs/: `python -m jobs.<stage>` forwards to `vistr <stage>` (config, --address auto in a job)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs._entry import StageError, main, stage_argv
from vistr.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]


def test_config_and_the_jobs_cluster_are_forwarded() -> None:
    args = ["--src", "/d", "--out", "/s"]
    assert stage_argv("preprocess", "c.yaml", args, cluster=False) == [
        "preprocess",
        "--config",
        "c.yaml",
        *args,
    ]
    assert stage_argv("preprocess", "c.yaml", args, cluster=True)[-2:] == ["--address", "auto"]
    for named in (["--address", "10.0.0.1:6379"], ["--address=10.0.0.1:6379"]):
        assert stage_argv("train", None, named, cluster=True) == ["train", *named]


def test_a_config_goes_where_the_subcommand_takes_it() -> None:
    # `vistr workflow CONFIG` takes it as its positional argument.
    assert stage_argv("workflow", "c.yaml", ["--status"], cluster=True) == [
        "workflow", "c.yaml", "--status", "--address", "auto"]  # fmt: skip
    with pytest.raises(StageError, match="`vistr evaluate` takes no config"):
        stage_argv("evaluate", "c.yaml", [], cluster=False)


def test_unknown_and_unregistered_stages_fail_clearly(monkeypatch, capsys) -> None:
    with pytest.raises(StageError, match="unknown stage 'predict'"):
        stage_argv("predict", None, [], cluster=False)
    monkeypatch.delitem(COMMANDS, "tune", raising=False)
    assert main("tune", ["--config", "configs/ablations/a_clip_length.yaml"]) == 2
    assert (
        "jobs.tune: error: stage tune: `vistr tune` is not a subcommand of this checkout"
        in capsys.readouterr().err
    )


def test_main_returns_the_subcommands_status(tmp_path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  bogus_key: 1\n")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as in a job: the config fails before Ray is reached
    assert main("train", ["--config", str(bad), "--shards", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"jobs.train: vistr train --config {bad} --shards {tmp_path} --address auto" in out
    assert "unknown config key(s) train.bogus_key" in err


def test_the_module_runs_with_python_m(tmp_path) -> None:
    """What the head runs: `python -m jobs.<stage>` in the unpacked checkout, exit status passed on."""
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", str(tmp_path / "missing.yaml"), "--shards", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "missing.yaml: no such config file or preset" in done.stderr
