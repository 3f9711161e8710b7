"""A function in its own spawned process, driven over a pipe: what benchmarks use so that each
contender's peak memory is its own.

Protocol: the child sends ``("ready", payload)`` once it is set up, ``("skip", why)`` when it
cannot run here, or ``("error", why)``; then it answers each request message until ``"stop"``.
"""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any


class Unavailable(Exception):
    """A contender that cannot run here; the message says why."""


class SpawnedWorker:
    """Start ``target(conn, *args)`` in a spawned process and wait until it is ready.

    ``ready`` holds the payload the child sent with "ready". Raises ``Unavailable`` on "skip"
    and RuntimeError on "error" or when the child dies (for example killed for memory).
    """

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.proc.start()
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.proc.join()
            status, payload = "error", f"worker died (exit code {self.proc.exitcode}; out of memory?)"
        if status != "ready":
            self.close()
            raise (Unavailable if status == "skip" else RuntimeError)(payload)
        self.ready = payload

    def request(self, message: Any = "run") -> Any:
        """Send one request and return the child's answer."""
        try:
            self.conn.send(message)
            return self.conn.recv()
        except (EOFError, BrokenPipeError) as err:  # killed, e.g. by the kernel's OOM killer
            self.proc.join(timeout=30)
            raise RuntimeError(f"worker died (exit code {self.proc.exitcode})") from err

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(timeout=60)
