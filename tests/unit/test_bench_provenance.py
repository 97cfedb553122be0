"""Benchmarks refuse to record results that no commit reproduces, unless told --allow-dirty."""

from __future__ import annotations

import argparse
import json

import pytest

common = pytest.importorskip("benchmarks.common")


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(common, "_allow_dirty", False)
    return tmp_path


def test_dirty_tree_is_refused_before_the_benchmark_starts(results_dir, monkeypatch):
    monkeypatch.setattr(common, "git_commit", lambda: "0123abc+dirty")
    with pytest.raises(SystemExit, match="uncommitted changes.*--allow-dirty"):
        common.require_clean_tree(allow_dirty=False)
    with pytest.raises(SystemExit, match="not writing x.json"):
        common.write_results("x", {"a": 1})
    assert not (results_dir / "x.json").exists()


def test_allow_dirty_is_recorded(results_dir, monkeypatch):
    monkeypatch.setattr(common, "git_commit", lambda: "0123abc+dirty")
    parser = argparse.ArgumentParser()
    common.add_provenance_arguments(parser)
    common.require_clean_tree(parser.parse_args(["--allow-dirty"]).allow_dirty)
    payload = json.loads(common.write_results("x", {"a": 1}).read_text())
    assert payload["git_commit"] == "0123abc+dirty" and payload["allow_dirty"] is True


def test_clean_tree_writes_without_the_mark(results_dir, monkeypatch):
    monkeypatch.setattr(common, "git_commit", lambda: "0123abc")
    common.require_clean_tree(allow_dirty=False)
    payload = json.loads(common.write_results("x", {"a": 1}).read_text())
    assert payload["git_commit"] == "0123abc" and "allow_dirty" not in payload
