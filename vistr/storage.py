"""One file-system layer for every place the project takes a path: local folders and object stores.

Shard sets, run storage, checkpoints, Tune results and workflow outputs may live on a local disk
(a laptop, a shared POSIX volume) or in an object store (``s3://bucket/prefix``, ``gs://…``) on a
cluster without a shared disk. Everything goes through ``pyarrow.fs`` — the layer Ray Data and Ray
Train already use — so a location is a plain string everywhere and no code calls ``Path`` on a URI.

Object-store credentials and endpoints come from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``),
which pyarrow reads itself; nothing here hard-codes a provider.

Atomicity: ``write_bytes`` on a local disk writes a temporary file and renames it, and an object
store's single PUT is atomic by itself, so a reader never sees half a file under the final name on
either.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` locations (object stores); False for local paths."""
    return "://" in str(location) and not str(location).startswith("file://")


def resolve(location: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """The file system and the path inside it for a local path or a URI.

    Local paths are made absolute, so a location means the same thing whichever way it was typed.
    """
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    return pafs.FileSystem.from_uri(text)


def canonical(location: str | os.PathLike[str]) -> str:
    """One spelling per location: absolute local paths, URIs without a trailing slash."""
    text = str(location)
    return text.rstrip("/") if is_uri(text) else resolve(text)[1]


def join(location: str | os.PathLike[str], *parts: str) -> str:
    """``location/part/…`` with forward slashes, for local paths and URIs alike."""
    base = str(location).rstrip("/") if is_uri(location) else str(location)
    if not is_uri(base):
        return str(Path(base, *parts))
    return posixpath.join(base, *parts)


def exists(location: str | os.PathLike[str]) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(location: str | os.PathLike[str]) -> int:
    """Bytes of a file; FileNotFoundError naming it when absent."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    return int(info.size)


def read_bytes(location: str | os.PathLike[str]) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_text(location: str | os.PathLike[str]) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file so that readers see either the old one or the new one, never a part."""
    fs, path = resolve(location)
    parent = posixpath.dirname(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix="-" + posixpath.basename(path))
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_text(location: str | os.PathLike[str], text: str) -> None:
    write_bytes(location, text.encode())


def delete(location: str | os.PathLike[str]) -> None:
    """Remove a file or a folder tree; nothing to do when it is absent."""
    fs, path = resolve(location)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def list_files(location: str | os.PathLike[str], suffix: str = "") -> list[str]:
    """Sorted locations of the files directly inside a folder (``[]`` when it is absent)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    return [join(location, name) for name in names if name.endswith(suffix)]
