"""Run a function in ``world_size`` local processes as torchrun would start them (tests, benchmarks).

Each process gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and a
free MASTER_PORT), so the code under test starts torch.distributed exactly as under torchrun.
A deadline bounds the whole run: a hung collective fails instead of hanging.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple, env: dict) -> None:
    os.environ.update(env)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    result = fn(*args)
    with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as handle:
        pickle.dump(result, handle)


def run_local(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, env: dict | None = None) -> list[Any]:
    """``fn(*args)`` in ``world_size`` spawned processes; returns each rank's result in rank order.

    ``fn`` must be importable (a module-level function) and its result picklable. A worker's
    exception is raised here; running past ``timeout`` seconds kills the workers and raises
    TimeoutError.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _worker, args=(fn, world_size, free_port(), out_dir, args, env or {}), nprocs=world_size,
            join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.kill()
                raise TimeoutError(f"{world_size} processes running {fn.__name__} passed the {timeout:.0f} s deadline")
        results = []
        for rank in range(world_size):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as handle:
                results.append(pickle.load(handle))
        return results
