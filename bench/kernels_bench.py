"""Measurement library for the sae_kernels benchmarks: inputs, cases, timing, peak memory.

Three groups of cases, each timed in the same run as its baselines:

* ``encoder``: ``topk_encode`` against the bare GEMM ``x @ W_enc.T`` (into a preallocated
  output), the same GEMM in the chunked path's row chunks (its floor), dense
  ``torch.topk(x @ W_enc.T + b_enc, k)``, and sparsify's fused encoder.
* ``decoder``: ``sparse_decode`` against ``F.embedding_bag`` and sparsify's decoder.
* ``backward``: one SAE forward+backward (encode ``x - b_dec``, decode, ``+ b_dec``, FVU loss
  as sparsify trains) against the same model in dense PyTorch and sparsify's ``SparseCoder``.

Every case is built by a function ``inputs -> (zero-argument callable)``; the callable's
return value is what correctness checks compare. Timing repeats the cases interleaved
(round-robin) and keeps medians, so background load hits every case alike.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what was allocated before
the call. On CPU, each case lives in its own spawned worker process (so one case's freed
memory cannot hide another's peak); after one warm-up call, the peak resident set growth of
a second call is read from the kernel's high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable).
"""
from __future__ import annotations

import contextlib
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sae_engine.workers import SpawnedWorker, Unavailable

GROUPS = ("encoder", "decoder", "backward")
BASELINE = {"encoder": "gemm", "decoder": "embedding_bag", "backward": "torch"}
TORCH_CASE = {"encoder": "torch_topk", "decoder": "embedding_bag", "backward": "torch"}
CASES = {
    "encoder": ("gemm", "gemm_chunked", "torch_topk", "sae_kernels", "sparsify"),
    "decoder": ("embedding_bag", "sae_kernels", "sparsify"),
    "backward": ("torch", "sae_kernels", "sparsify"),
}


@dataclass(frozen=True)
class Shape:
    """One problem size: x[B, d], W_enc/W_dec[n, d], k latents per row, in ``dtype``."""

    B: int
    d: int
    n: int
    k: int
    dtype: str  # "float32" | "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"B={self.B} d={self.d} n={self.n} k={self.k} {self.dtype}"


# Named shape sets per device. CPU "target" is the acceptance case of the chunked path;
# CUDA "target" is the wide-SAE case the fused Triton kernels are built for.
SHAPES: dict[tuple[str, str], tuple[Shape, ...]] = {
    ("cpu", "small"): (Shape(1024, 320, 16384, 32, "float32"), Shape(1024, 320, 16384, 32, "bfloat16")),
    ("cpu", "target"): (Shape(8192, 320, 131072, 32, "float32"), Shape(8192, 320, 131072, 32, "bfloat16")),
    ("cuda", "small"): (Shape(4096, 1280, 16384, 32, "bfloat16"),),
    ("cuda", "target"): (Shape(4096, 1280, 131072, 32, "bfloat16"), Shape(4096, 1280, 1048576, 32, "bfloat16")),
}


@dataclass
class Inputs:
    """Tensors shared by all cases of one shape: a TopK SAE and a batch, plus a sparse code.

    x [B, d]; W_enc, W_dec [n, d]; b_enc [n]; b_dec [d]; values [B, k] (positive) and
    indices [B, k] int64 (uniform over latents: the decoder's cache-unfriendly case).
    """

    shape: Shape
    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor


def make_inputs(shape: Shape, device: str, seed: int = 0) -> Inputs:
    """Random inputs on ``device``: unit-norm-ish encoder rows, decoder = encoder (SAE init)."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt, B, d, n, k = shape.torch_dtype, shape.B, shape.d, shape.n, shape.k

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=g, device=device) * scale).to(dt)

    W_enc = randn(n, d, scale=d**-0.5)
    return Inputs(
        shape=shape,
        x=randn(B, d),
        W_enc=W_enc,
        b_enc=randn(n, scale=0.01),  # nonzero so the bias add is exercised; small to keep ties rare
        W_dec=W_enc.clone(),
        b_dec=randn(d, scale=0.01),
        values=torch.rand(B, k, generator=g, device=device).to(dt),
        indices=torch.randint(0, n, (B, k), generator=g, device=device),
    )


# ---------------------------------------------------------------------------------------------
# Optional sparsify.
# ---------------------------------------------------------------------------------------------


def load_sparsify(device: str) -> Any:
    """Import EleutherAI sparsify, or raise ``Unavailable``.

    Its Triton decoder needs CUDA tensors, so on CPU it is switched to its eager
    ``embedding_bag`` decoder through its own ``SPARSIFY_DISABLE_TRITON`` switch.
    """
    if device != "cuda":
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        # sparsify prints its decoder choice on import; keep stdout clean for --json.
        with contextlib.redirect_stdout(sys.stderr):
            import sparsify
            import sparsify.utils
    except ImportError as err:
        raise Unavailable(f"sparsify not importable ({err}); pip install eai-sparsify") from err
    return sparsify


def sparsify_note(device: str) -> str:
    """What differs in the sparsify measurement on this device."""
    return "" if device == "cuda" else "sparsify eager decoder (its Triton decoder needs CUDA)"


# ---------------------------------------------------------------------------------------------
# Cases: inputs -> zero-argument callable.
# ---------------------------------------------------------------------------------------------

Builder = Callable[[Inputs], Callable[[], Any]]


def _encoder_gemm(inp: Inputs) -> Callable[[], torch.Tensor]:
    """Bare ``x @ W_enc.T`` [B, n] into a preallocated output: no page faults, no selection."""
    out = torch.empty(inp.shape.B, inp.shape.n, dtype=inp.x.dtype, device=inp.x.device)
    return lambda: torch.mm(inp.x, inp.W_enc.T, out=out)


def _encoder_gemm_chunked(inp: Inputs) -> Callable[[], torch.Tensor]:
    """The same GEMM in the row chunks the chunked encoder uses, into one reused buffer: the
    floor of that path, so its distance to ``sae_kernels`` is the cost of selection."""
    from sae_kernels.chunked import rows_per_chunk

    B, n = inp.shape.B, inp.shape.n
    rows = rows_per_chunk(n, B, inp.x.element_size())
    out = torch.empty(rows, n, dtype=inp.x.dtype, device=inp.x.device)

    def run() -> torch.Tensor:
        for start in range(0, B, rows):
            last = torch.mm(inp.x[start : start + rows], inp.W_enc.T, out=out[: min(rows, B - start)])
        return last  # the last chunk's pre-activations, for correctness checks

    return run


def _encoder_torch(inp: Inputs) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Dense baseline: materialize [B, n] pre-activations, then ``torch.topk``."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        top, idx = torch.topk(torch.addmm(inp.b_enc, inp.x, inp.W_enc.T), inp.shape.k, dim=1)
        return top.relu(), idx

    return run


def _encoder_ours(inp: Inputs) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    import sae_kernels

    return lambda: sae_kernels.topk_encode(inp.x, inp.W_enc, inp.b_enc, inp.shape.k)


def _encoder_sparsify(inp: Inputs) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """sparsify's ``fused_encoder`` (linear, ReLU, unsorted topk), as ``SparseCoder.encode`` calls it."""
    fused = load_sparsify(inp.x.device.type).fused_encoder.fused_encoder

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        out = fused(inp.x, inp.W_enc, inp.b_enc, inp.shape.k, "topk")
        return out.top_acts, out.top_indices

    return run


def _decoder_embedding_bag(inp: Inputs) -> Callable[[], torch.Tensor]:
    return lambda: F.embedding_bag(inp.indices, inp.W_dec, per_sample_weights=inp.values, mode="sum")


def _decoder_ours(inp: Inputs) -> Callable[[], torch.Tensor]:
    import sae_kernels

    return lambda: sae_kernels.sparse_decode(inp.values, inp.indices, inp.W_dec)


def _decoder_sparsify(inp: Inputs) -> Callable[[], torch.Tensor]:
    """sparsify's ``decoder_impl`` called as ``SparseCoder.decode`` does (it takes ``W_dec.mT``)."""
    decode = load_sparsify(inp.x.device.type).utils.decoder_impl
    return lambda: decode(inp.indices, inp.values, inp.W_dec.mT)


def fvu(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained, sparsify's training loss: sum((x - recon)^2) / var."""
    total_variance = (x - x.mean(0)).pow(2).sum()
    return (x - recon).pow(2).sum() / total_variance


def _leaf_params(inp: Inputs) -> dict[str, torch.Tensor]:
    """Fresh trainable copies of the SAE parameters."""
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    return {name: getattr(inp, name).clone().requires_grad_() for name in names}


def _step(
    params: dict[str, torch.Tensor], loss_fn: Callable[[], torch.Tensor]
) -> Callable[[], dict[str, torch.Tensor]]:
    """One forward+backward; returns the gradients and drops them from the params afterwards
    so an idle case holds no gradient memory."""

    def run() -> dict[str, torch.Tensor]:
        loss_fn().backward()
        grads = {name: p.grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
        return grads

    return run


def _backward_torch(inp: Inputs) -> Callable[[], dict[str, torch.Tensor]]:
    """Dense PyTorch SAE: [B, n] GEMM, topk, gather decode (its dW_dec is an index_put scatter)."""
    p, k = _leaf_params(inp), inp.shape.k

    def loss() -> torch.Tensor:
        pre = torch.addmm(p["b_enc"], inp.x - p["b_dec"], p["W_enc"].T)
        top, idx = torch.topk(pre, k, dim=1)
        recon = (top.relu().unsqueeze(2) * p["W_dec"][idx]).sum(1) + p["b_dec"]
        return fvu(recon, inp.x)

    return _step(p, loss)


def _backward_ours(inp: Inputs) -> Callable[[], dict[str, torch.Tensor]]:
    import sae_kernels

    p, k = _leaf_params(inp), inp.shape.k

    def loss() -> torch.Tensor:
        values, idx = sae_kernels.topk_encode(inp.x - p["b_dec"], p["W_enc"], p["b_enc"], k)
        return fvu(sae_kernels.sparse_decode(values, idx, p["W_dec"]) + p["b_dec"], inp.x)

    return _step(p, loss)


def _backward_sparsify(inp: Inputs) -> Callable[[], dict[str, torch.Tensor]]:
    """sparsify's ``SparseCoder`` forward and ``fvu.backward()``, its weights set to ours."""
    sparsify = load_sparsify(inp.x.device.type)
    s = inp.shape
    cfg = sparsify.SparseCoderConfig(num_latents=s.n, k=s.k)
    sae = sparsify.SparseCoder(s.d, cfg, device=inp.x.device, dtype=s.torch_dtype)
    with torch.no_grad():
        sae.encoder.weight.copy_(inp.W_enc)
        sae.encoder.bias.copy_(inp.b_enc)
        sae.W_dec.copy_(inp.W_dec)
        sae.b_dec.copy_(inp.b_dec)
    params = {"W_enc": sae.encoder.weight, "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    return _step(params, lambda: sae(inp.x).fvu)


BUILDERS: dict[tuple[str, str], Builder] = {
    ("encoder", "gemm"): _encoder_gemm,
    ("encoder", "gemm_chunked"): _encoder_gemm_chunked,
    ("encoder", "torch_topk"): _encoder_torch,
    ("encoder", "sae_kernels"): _encoder_ours,
    ("encoder", "sparsify"): _encoder_sparsify,
    ("decoder", "embedding_bag"): _decoder_embedding_bag,
    ("decoder", "sae_kernels"): _decoder_ours,
    ("decoder", "sparsify"): _decoder_sparsify,
    ("backward", "torch"): _backward_torch,
    ("backward", "sae_kernels"): _backward_ours,
    ("backward", "sparsify"): _backward_sparsify,
}


def build_case(group: str, name: str, inp: Inputs) -> Callable[[], Any]:
    """The callable for one case; forward-only groups run under ``torch.no_grad``."""
    fn = BUILDERS[group, name](inp)
    if group == "backward":
        return fn

    def no_grad_fn() -> Any:
        with torch.no_grad():
            return fn()

    return no_grad_fn


# ---------------------------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------------------------


def time_call(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call; on CUDA between events, after all queued work."""
    if device == "cuda":
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        return start.elapsed_time(stop) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_kib(field_name: str) -> int | None:
    """A ``kB`` field of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    return 1024 * (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the RSS before a call is live data only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak(fn: Callable[[], Any], device: str) -> tuple[int, int]:
    """Run ``fn`` twice (warm-up, then measured); return (peak bytes above the level before the
    measured call, absolute peak bytes during it).

    The warm-up keeps one-time costs (lazy imports, BLAS workspaces) out of the number.
    CUDA: allocator statistics. CPU: process resident set (call it in a fresh process).
    """
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return peak - before, peak
    _release_free_heap()
    _reset_peak_rss()
    before = _rss_bytes()
    fn()
    peak = _peak_rss_bytes()
    return max(0, peak - before), peak


# ---------------------------------------------------------------------------------------------
# Runners: one case each, in this process (CUDA, pytest) or in a worker process (CPU).
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured case. Times in seconds; memory in bytes; ratios are time / other time."""

    group: str
    case: str
    shape: str
    device: str
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    ratio: float | None = None  # time / the group's baseline time
    speedup_vs_torch: float | None = None  # plain-torch time / time
    peak_growth_bytes: int | None = None
    peak_rss_bytes: int | None = None
    gbps: float | None = None  # decoder only: bytes moved / time
    bandwidth_fraction: float | None = None  # decoder only: gbps / measured copy bandwidth
    note: str = ""


class InProcessCase:
    """A case built and run in the calling process."""

    def __init__(self, group: str, name: str, inp: Inputs, device: str):
        self.device = device
        self.fn = build_case(group, name, inp)
        self.peak = measure_peak(self.fn, device)

    def run(self) -> float:
        return time_call(self.fn, self.device)

    def close(self) -> None:
        self.fn = None


def _worker(conn: Any, group: str, name: str, shape: Shape, device: str, threads: int) -> None:
    """Worker process loop: build, warm up while measuring memory, then time on request."""
    torch.set_num_threads(threads)
    try:
        fn = build_case(group, name, make_inputs(shape, device))
        conn.send(("ready", measure_peak(fn, device)))
    except Unavailable as err:
        conn.send(("skip", str(err)))
        return
    except Exception as err:  # report, so the parent records the case instead of hanging
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    try:
        while conn.recv() == "run":
            conn.send(time_call(fn, device))
    except EOFError:  # the parent went away
        return


class WorkerCase(SpawnedWorker):
    """A case in its own spawned process, so its peak RSS is its own."""

    def __init__(self, group: str, name: str, shape: Shape, device: str):
        super().__init__(_worker, (group, name, shape, device, torch.get_num_threads()))
        self.peak = self.ready

    def run(self) -> float:
        return self.request("run")


# ---------------------------------------------------------------------------------------------
# Decoder bandwidth.
# ---------------------------------------------------------------------------------------------


def decoder_bytes(shape: Shape) -> int:
    """Bytes a decoder must move: k gathered rows per token, the code, and the output."""
    elem = torch.tensor([], dtype=shape.torch_dtype).element_size()
    gathered = shape.B * shape.k * shape.d * elem
    code = shape.B * shape.k * (elem + 8)
    return gathered + code + shape.B * shape.d * elem


def copy_bandwidth(device: str, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write), best of ``repeats``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = min(time_call(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * nbytes / best


# ---------------------------------------------------------------------------------------------
# A group: build every case, time them interleaved, fill in ratios.
# ---------------------------------------------------------------------------------------------


def _open_case(group: str, name: str, shape: Shape, device: str, inp: Inputs | None) -> Any:
    return WorkerCase(group, name, shape, device) if inp is None else InProcessCase(group, name, inp, device)


def run_group(
    group: str,
    shape: Shape,
    device: str,
    *,
    repeats: int = 3,
    isolate: bool | None = None,
    cases: tuple[str, ...] | None = None,
    copy_bw: float | None = None,
) -> list[Row]:
    """Measure every case of ``group`` at ``shape``; returns one Row per case.

    isolate: one worker process per case (default on CPU, where peak RSS needs it).
    copy_bw: copy bandwidth in bytes/s for the decoder's bandwidth fraction.
    """
    isolate = device == "cpu" if isolate is None else isolate
    inp = None if isolate else make_inputs(shape, device)
    rows, opened = {}, {}
    for name in cases or CASES[group]:
        row = rows[name] = Row(group, name, shape.label, device)
        if name == "sparsify":
            row.note = sparsify_note(device)
        try:
            opened[name] = _open_case(group, name, shape, device, inp)
        except Unavailable as err:
            row.note = f"skipped: {err}"
        except (RuntimeError, torch.OutOfMemoryError) as err:
            row.note = f"failed: {err}"
        else:
            row.peak_growth_bytes, row.peak_rss_bytes = opened[name].peak
    try:
        for _ in range(repeats):
            for name, case in list(opened.items()):
                try:
                    rows[name].times_s.append(case.run())
                except RuntimeError as err:
                    rows[name].note = f"failed: {err}"
                    rows[name].times_s.clear()
                    del opened[name]
    finally:
        for case in opened.values():
            case.close()
    _fill_ratios(group, shape, list(rows.values()), copy_bw)
    return list(rows.values())


def _fill_ratios(group: str, shape: Shape, rows: list[Row], copy_bw: float | None) -> None:
    for row in rows:
        if row.times_s:
            row.time_s = statistics.median(row.times_s)
    by_name = {row.case: row for row in rows}
    base, torch_row = by_name.get(BASELINE[group]), by_name.get(TORCH_CASE[group])
    for row in rows:
        if row.time_s is None:
            continue
        if base is not None and base.time_s:
            row.ratio = row.time_s / base.time_s
        if torch_row is not None and torch_row.time_s:
            row.speedup_vs_torch = torch_row.time_s / row.time_s
        if group == "decoder":
            row.gbps = decoder_bytes(shape) / row.time_s / 1e9
            if copy_bw:
                row.bandwidth_fraction = row.gbps * 1e9 / copy_bw


def run_all(
    device: str, shape_set: str, *, groups: tuple[str, ...] = GROUPS, repeats: int = 3
) -> tuple[list[Row], dict[str, Any]]:
    """Every group at every shape of ``SHAPES[device, shape_set]``; returns (rows, machine info)."""
    info = machine_info(device)
    copy_bw = copy_bandwidth(device) if "decoder" in groups else None
    info["copy_bandwidth_gbps"] = None if copy_bw is None else round(copy_bw / 1e9, 1)
    rows: list[Row] = []
    for shape in SHAPES[device, shape_set]:
        for group in groups:
            rows += run_group(group, shape, device, repeats=repeats, copy_bw=copy_bw)
    return rows, info


def machine_info(device: str) -> dict[str, Any]:
    """Versions and hardware names to print next to the numbers."""
    import platform

    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpu": _cpu_model() or platform.processor(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from importlib.metadata import version

        info["sparsify"] = version("eai-sparsify")
    except Exception:
        info["sparsify"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# Acceptance targets.
# ---------------------------------------------------------------------------------------------

GIB = 1 << 30


def check_targets(rows: list[Row], device: str) -> list[str]:
    """One PASS/FAIL line per target that the measured rows cover.

    CPU: encoder time <= 1.5x the bare GEMM and peak growth < 1.5 GiB.
    CUDA: encoder throughput >= 85% of the bare GEMM; forward+backward >= 3x faster than
    sparsify with less peak memory.
    """
    lines = []
    for shape in dict.fromkeys(row.shape for row in rows):
        got = {(r.group, r.case): r for r in rows if r.shape == shape}
        enc = got.get(("encoder", "sae_kernels"))
        if enc is not None and enc.ratio is not None:
            if device == "cpu":
                lines.append(_verdict(shape, "encoder time / GEMM <= 1.5", enc.ratio, enc.ratio <= 1.5))
            else:
                throughput = 1 / enc.ratio
                lines.append(_verdict(shape, "encoder GEMM-throughput >= 0.85", throughput, throughput >= 0.85))
        if device == "cpu" and enc is not None and enc.peak_growth_bytes is not None:
            gib = enc.peak_growth_bytes / GIB
            lines.append(_verdict(shape, "encoder peak growth < 1.5 GiB", gib, gib < 1.5))
        ours, theirs = got.get(("backward", "sae_kernels")), got.get(("backward", "sparsify"))
        if device == "cuda" and ours and theirs and ours.time_s and theirs.time_s:
            speedup = theirs.time_s / ours.time_s
            lines.append(_verdict(shape, "fwd+bwd speedup vs sparsify >= 3", speedup, speedup >= 3))
            ours_gib = (ours.peak_growth_bytes or 0) / GIB
            theirs_bytes = math.inf if theirs.peak_growth_bytes is None else theirs.peak_growth_bytes
            less = ours.peak_growth_bytes is not None and ours.peak_growth_bytes < theirs_bytes
            lines.append(_verdict(shape, "fwd+bwd peak memory (GiB) < sparsify's", ours_gib, less))
    return lines


def _verdict(shape: str, what: str, value: float, ok: bool) -> str:
    return f"{'PASS' if ok else 'FAIL'}  [{shape}] {what}: {value:.3f}"


def rows_as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]
