"""What every benchmark suite shares: contenders in worker processes, timing, peak-memory probes,
the machine's description and JSON output.

A contender is set up by a module-level function ``setup(*args) -> (ready, run)``: ``ready`` is
what it reports once built (for example its peak memory), ``run`` a zero-argument callable whose
result is sent back on each request (for example one step's seconds). :class:`Worker` runs it
in its own spawned process, so its peak memory and allocator state are its own;
:class:`InProcess` runs it in the caller (CUDA, where allocator statistics are per device, and
quick checks). Both answer ``run()`` and ``close()`` alike.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

MIB = 1 << 20
Setup = Callable[..., tuple[Any, Callable[[], Any] | None]]


class Unavailable(Exception):
    """A contender that cannot run here (a peer not installed, no CUDA); the message says why."""


def _serve(conn: Any, setup: Setup, args: tuple[Any, ...], threads: int | None) -> None:
    """Child side: set up, report ``("ready", payload)`` / ``("skip", why)`` / ``("error", why)``,
    then answer each ``"run"`` request with ``run()``'s result until ``"stop"``."""
    sys.stdout = sys.stderr  # what peers print (sparsify at import) must not mix into the parent's JSON
    if threads:
        torch.set_num_threads(threads)
    try:
        ready, run = setup(*args)
    except Unavailable as err:
        conn.send(("skip", str(err)))
        return
    except Exception as err:  # reported as the contender's note instead of hanging the parent
        first_line = str(err).splitlines()[0] if str(err) else ""
        conn.send(("error", f"{type(err).__name__}: {first_line}"))
        return
    conn.send(("ready", ready))
    try:
        while conn.recv() == "run":
            conn.send(run())
    except EOFError:  # the parent went away
        return


class Worker:
    """``setup(*args)`` in a spawned process, driven over a pipe.

    ``ready`` holds the payload of the child's setup. Raises :class:`Unavailable` when the
    contender cannot run here and RuntimeError when its setup fails or the child dies (for
    example killed for memory).
    """

    def __init__(self, setup: Setup, *args: Any, threads: int | None = None) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        threads = threads or torch.get_num_threads()
        self.proc = ctx.Process(target=_serve, args=(child, setup, args, threads), daemon=True)
        self.proc.start()
        child.close()
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=30)
            status, payload = "error", f"worker died (exit code {self.proc.exitcode}; out of memory?)"
        if status != "ready":
            self.close()
            raise (Unavailable if status == "skip" else RuntimeError)(payload)
        self.ready = payload

    def run(self) -> Any:
        """One request: the result of the child's ``run()``."""
        try:
            self.conn.send("run")
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
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=10)


class InProcess:
    """``setup(*args)`` in this process, with :class:`Worker`'s interface."""

    def __init__(self, setup: Setup, *args: Any, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # as in a worker: stdout is for the JSON
                self.ready, self._run = setup(*args)
        except (Unavailable, torch.OutOfMemoryError):
            raise
        except Exception as err:
            raise RuntimeError(f"{type(err).__name__}: {err}") from err

    def run(self) -> Any:
        with contextlib.redirect_stdout(sys.stderr):
            return self._run()

    def close(self) -> None:
        self._run = None


def open_contender(setup: Setup, *args: Any, isolate: bool, threads: int | None = None) -> Worker | InProcess:
    """A :class:`Worker` (``isolate``) or an :class:`InProcess` contender."""
    return (Worker if isolate else InProcess)(setup, *args, threads=threads)


def run_once(setup: Setup, *args: Any, isolate: bool = True, threads: int | None = None) -> Any:
    """Set a contender up (in a fresh process when ``isolate``) and return its ready payload."""
    contender = open_contender(setup, *args, isolate=isolate, threads=threads)
    contender.close()
    return contender.ready


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def synchronize(device: str, result: Any = None) -> None:
    """Wait until queued work is done (CUDA queue, JAX async dispatch of ``result``)."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(wall seconds of one call including its queued work, the call's result)."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device, result)
    return time.perf_counter() - t0, result


# ---------------------------------------------------------------------------------------------
# Peak memory.
# ---------------------------------------------------------------------------------------------


def _status_bytes(name: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of this process: CUDA allocator statistics, or on the CPU the resident set's
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``). ``baseline`` is the
    level when the probe was made."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = self.current()

    def current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        rss = _status_bytes("VmRSS")
        if rss is not None:
            return rss
        import psutil

        return psutil.Process().memory_info().rss

    def reset(self) -> None:
        """Forget earlier peaks; freed heap goes back to the OS first, so the RSS is live data."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except (OSError, AttributeError):
            pass  # the high-water mark then also holds what came before

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        hwm = _status_bytes("VmHWM")
        return hwm if hwm is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_of_call(fn: Callable[[], Any], device: str) -> tuple[int, int]:
    """Call ``fn`` twice (warm-up, then measured); -> (peak bytes above the level before the
    measured call, absolute peak bytes during it). On the CPU call it in a fresh process."""
    fn()
    probe = MemoryProbe(device)
    probe.reset()
    before = probe.current()
    fn()
    peak = probe.peak()
    return max(0, peak - before), peak


# ---------------------------------------------------------------------------------------------
# The machine and the output.
# ---------------------------------------------------------------------------------------------


def machine_info(device: str, packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """Date, hardware and versions to print beside every number.

    ``cpu`` names the model and its vector/matrix features (``sae_kernels.hardware``), because
    the same code is 2-9x apart between CPUs with and without bf16 units.
    """
    from importlib.metadata import PackageNotFoundError, version

    from sae_kernels.hardware import cpu_info

    from ..training.precision import resolve_precision

    cpu = cpu_info()
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu.describe(),
        "cpu_model": cpu.model,
        "cpu_features": cpu.features,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    info["auto_precision"] = resolve_precision("auto", device).dtype
    for package in ("torch", "triton", *packages):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    return info


def machine_line(info: dict[str, Any]) -> str:
    """The machine in one line: CPU (features), GPU if any, cores, versions, date."""
    skip = {"cpu_model", "cpu_features"}
    return ", ".join(f"{key}: {value}" for key, value in info.items() if value is not None and key not in skip)


def print_json(result: dict[str, Any]) -> None:
    """One JSON object on stdout (everything else a suite prints goes to stderr)."""
    print(json.dumps(result, indent=2, default=str))


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    """``value * scale`` formatted, or "-" when missing."""
    return "-" if value is None else format(value * scale, spec)
