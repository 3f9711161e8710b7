"""Atomic writes: a file or folder appears whole under its name, or not at all.

Everything is written to a temporary name beside the target (same folder, so the rename stays on
one file system), flushed to disk, then renamed over the target; the folder's entry is synced
too. A crash at any moment leaves either the previous target or the new one, and at worst a
stray temporary that the next write replaces.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file under a folder, to disk."""
    for file in (p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        _fsync_file(file)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new contents to (a file or a folder).

    On leaving the block the temporary is synced (``fsync``) and renamed over ``path`` (an
    existing folder at ``path`` is removed first); if the block raises, the temporary is removed
    and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_text(path: str | Path, text: str, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, payload: Any, *, indent: int | None = 1, fsync: bool = True) -> None:
    """Replace ``path`` with ``payload`` as JSON (sorted keys) atomically."""
    write_text(path, json.dumps(payload, indent=indent, sort_keys=True), fsync=fsync)
