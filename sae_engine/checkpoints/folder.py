"""A run's checkpoints: folder names, the ``latest`` pointer, writing one, finding one to resume.

Layout of a run folder's ``checkpoints/``:
    step_000001234/   one checkpoint (see ``meta``), complete once it has this name
    latest            one line naming the newest complete checkpoint
Every layout writes a checkpoint the same way (``writing`` then ``commit``): its files go into a
temporary folder beside the final one; the folder is synced and renamed into place, then
``latest`` is replaced atomically and all but the newest ``keep`` are deleted (with any of a
higher step: those were passed over as unreadable when the run resumed). A crash at any
moment leaves the previous checkpoint intact. A write that fails (a full disk, permissions)
ends in one ``CheckpointWriteError`` naming the folder, what failed and the checkpoint kept.
"""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import fsync_dir, fsync_tree, write_text
from .meta import CheckpointError, verify

CHECKPOINTS, LATEST = "checkpoints", "latest"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names it, why, and the checkpoint kept."""


def step_folder(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:09d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which is missing")
    return path


def step_folders(run_dir: str | Path) -> list[Path]:
    """Every checkpoint folder of a run, newest step first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)


@dataclass
class Resumable:
    """The newest checkpoint that looks readable, and the newer ones passed over, with why."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def newest_readable(run_dir: str | Path, after: list[tuple[Path, str]] = ()) -> Resumable:
    """The newest complete, readable checkpoint of a run (``meta.verify``), passing over broken
    ones; ``after``: checkpoints already found unreadable (skipped too, reported first)."""
    skipped = list(after)
    passed = {path for path, _ in skipped}
    for path in step_folders(run_dir):
        if path in passed:
            continue
        why = verify(path)
        if why is None:
            return Resumable(path, skipped)
        skipped.append((path, why))
    return Resumable(None, skipped)


def _kept(run_dir: Path) -> str:
    try:
        path = latest_checkpoint(run_dir)
    except CheckpointError:
        path = None
    return f"the last complete checkpoint, {path}, is kept" if path else "no earlier checkpoint exists"


@contextmanager
def writing(run_dir: str | Path, step: int, *, create: bool = True) -> Iterator[Path]:
    """Yield the temporary folder that checkpoint ``step`` is written into (made empty when
    ``create``; other ranks of a sharded save pass False and write into the one rank 0 made).
    Any failure inside becomes one ``CheckpointWriteError``; the temporary folder is removed."""
    final = step_folder(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        if create:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        yield tmp
    except CheckpointWriteError:
        raise
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        if isinstance(error, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        if create:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = " ".join(str(error).split()) or type(error).__name__
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {reason}; {_kept(Path(run_dir))}") from None


def commit(run_dir: str | Path, step: int, keep: int) -> Path:
    """Rename the written temporary folder of checkpoint ``step`` into place, point ``latest``
    at it and keep the newest ``keep`` checkpoints (keep <= 0: all). Returns the folder."""
    final = step_folder(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    with writing(run_dir, step, create=False):
        fsync_tree(tmp)
        if final.is_dir():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(final.parent)
        write_text(final.parent / LATEST, final.name + "\n")
    folders = step_folders(run_dir)
    newer = [p for p in folders if p.name > final.name]  # passed over as unreadable when the run resumed
    older = [p for p in folders if p.name < final.name]
    for old in newer + (older[keep - 1:] if keep > 0 else []):
        shutil.rmtree(old, ignore_errors=True)
    return final
