"""One training run per run folder: an exclusive lock held while a run trains.

The lock is an ``flock`` on the run folder itself, which the kernel releases when its process
ends in any way (kill -9 included), so the lock of a dead process is simply taken over, and
nothing is written into the folder for it. A second run names the holder from the kernel's lock
table (``/proc/locks``, where the system has one).
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """Another process is training in this run folder."""


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir`` (made if missing) for this process, or raises
    RunLockedError naming the process that holds it."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.fstat(fd))
            os.close(fd)
            raise RunLockedError(f"{self.path} is in use by another training run ({holder}); wait for it to end "
                                 "or use another train.out_dir") from None
        except OSError as error:  # a file system without flock: train unguarded rather than not at all
            log.warning("cannot lock %s (%s); nothing stops a second run on this folder", self.path, error)
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None

    __del__ = release  # a holder dropped without leaving the block lets go too


def _holder(stat: os.stat_result) -> str:
    """"process PID" for the flock on the file ``stat`` describes, from /proc/locks."""
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and device in fields:
                return f"process {fields[fields.index(device) - 1]}"
    except OSError:
        pass
    return "another process"
