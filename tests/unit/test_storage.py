"""vistr.storage on the local file system (the S3 side is exercised against a real endpoint in tests/cluster)."""

from __future__ import annotations

import os

import pytest

from vistr import storage


def test_local_paths_are_canonical_whatever_the_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.canonical("a/b") == str(tmp_path / "a" / "b")
    assert storage.canonical(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert storage.canonical("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert not storage.is_uri("a/b") and storage.is_uri("s3://bucket/x") and not storage.is_uri("file:///x")


def test_join_keeps_uris_posix():
    assert storage.join("s3://bucket/prefix/", "shards", "a.parquet") == "s3://bucket/prefix/shards/a.parquet"
    assert storage.join("/tmp/x", "y") == os.path.join("/tmp/x", "y")


def test_write_read_list_delete_round_trip(tmp_path):
    target = storage.join(str(tmp_path), "deep", "file.bin")
    assert not storage.exists(target)
    storage.write_bytes(target, b"\x00\x01payload")
    assert storage.read_bytes(target) == b"\x00\x01payload" and storage.size(target) == 9
    storage.write_text(storage.join(str(tmp_path), "deep", "note.txt"), "hello")
    assert [os.path.basename(p) for p in storage.list_files(storage.join(str(tmp_path), "deep"))] == [
        "file.bin", "note.txt"]
    assert storage.list_files(str(tmp_path / "absent")) == []
    # No temporary files are left beside the result.
    assert sorted(os.listdir(tmp_path / "deep")) == ["file.bin", "note.txt"]
    storage.delete(storage.join(str(tmp_path), "deep"))
    assert not storage.exists(target)
    storage.delete(target)  # absent: nothing to do
    with pytest.raises(FileNotFoundError, match="file.bin"):
        storage.size(target)
