"""Kernel benchmarks: ``sae-engine bench kernels [--device cpu|cuda] [--shape small|target|B,d,n,k] [--json]``.

Three groups of cases, each timed in the same run as its baselines:

* ``encoder``: ``topk_encode`` against the bare GEMM ``x @ W_enc.T`` (into a preallocated
  output), the same GEMM in the chunked path's row chunks (its floor), dense
  ``torch.topk(x @ W_enc.T + b_enc, k)``, and sparsify's fused encoder.
* ``decoder``: ``sparse_decode`` against ``F.embedding_bag`` and sparsify's decoder.
* ``backward``: one SAE forward+backward (encode ``x - b_dec``, decode, ``+ b_dec``, FVU loss
  as sparsify trains) against the same model in dense PyTorch and sparsify's ``SparseCoder``.

Every shape runs in each dtype of ``--dtypes`` (fp32 and bf16 by default), so every contender
is measured in each of its settings; the summary compares each at its faster one on this
machine, and says what ``precision = "auto"`` picks here. The table prints, per case, the
median time, the ratio to the group's baseline (encoder: the bare GEMM; decoder:
``F.embedding_bag``; backward: dense PyTorch), the speedup over plain PyTorch, peak memory, and
for the decoder the bandwidth against a copy measured in the same run; then PASS/FAIL lines
for the acceptance targets.

Cases are timed interleaved (round-robin) and medians kept, so background load hits every case
alike. Peak memory: on the CPU each case lives in its own worker process (one case's freed
memory cannot hide another's peak), on CUDA the allocator's peak above the level before the call.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .harness import (MIB, Unavailable, fmt, machine_info, machine_line, open_contender, peak_of_call,
                      print_json, timed)

GROUPS = ("encoder", "decoder", "backward")
BASELINE = {"encoder": "gemm", "decoder": "embedding_bag", "backward": "torch"}
TORCH_CASE = {"encoder": "torch_topk", "decoder": "embedding_bag", "backward": "torch"}
CASES = {
    "encoder": ("gemm", "gemm_chunked", "torch_topk", "sae_kernels", "sparsify"),
    "decoder": ("embedding_bag", "sae_kernels", "sparsify"),
    "backward": ("torch", "sae_kernels", "sparsify"),
}
OURS = "sae_kernels"
DTYPES = ("float32", "bfloat16")
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


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
    def size(self) -> str:
        return f"B={self.B} d={self.d} n={self.n} k={self.k}"

    @property
    def label(self) -> str:
        return f"{self.size} {self.dtype}"


# Named sizes (B, d, n, k) per device. CPU "target" is the acceptance case of the chunked path;
# CUDA "target" the wide SAEs the fused Triton kernels are built for.
SIZES: dict[tuple[str, str], tuple[tuple[int, int, int, int], ...]] = {
    ("cpu", "small"): ((1024, 320, 16384, 32),),
    ("cpu", "target"): ((8192, 320, 131072, 32),),
    ("cuda", "small"): ((4096, 1280, 16384, 32),),
    ("cuda", "target"): ((4096, 1280, 131072, 32), (4096, 1280, 1048576, 32)),
}


def shapes(device: str, shape: str, dtypes: tuple[str, ...] = DTYPES) -> list[Shape]:
    """The shapes of a named size set (``small``, ``target``) or of one ``B,d,n,k``, in each dtype."""
    if (device, shape) in SIZES:
        sizes = SIZES[device, shape]
    else:
        try:
            B, d, n, k = (int(part) for part in shape.split(","))
        except ValueError:
            raise ValueError(f"--shape {shape!r}: expected small, target or B,d,n,k (four integers)") from None
        sizes = ((B, d, n, k),)
    return [Shape(*size, dtype) for size in sizes for dtype in dtypes]


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
# Measuring a group: every case in its own contender, timed interleaved.
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One measured case. Times in seconds; memory in bytes; ratios are time / other time."""

    group: str
    case: str
    shape: str
    dtype: str
    device: str
    time_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    ratio: float | None = None  # time / the group's baseline time
    speedup_vs_torch: float | None = None  # plain-torch time / time
    peak_growth_bytes: int | None = None
    peak_bytes: int | None = None
    gbps: float | None = None  # decoder only: bytes moved / time
    bandwidth_fraction: float | None = None  # decoder only: gbps / measured copy bandwidth
    note: str = ""


def _setup_case(group: str, name: str, shape: Shape, device: str, inp: Inputs | None = None) -> tuple[Any, Callable[[], float]]:
    """A contender (see :mod:`.harness`): ready = (peak growth, peak) bytes; run -> seconds of one call."""
    fn = build_case(group, name, inp or make_inputs(shape, device))
    peak = peak_of_call(fn, device)
    return peak, lambda: timed(fn, device)[0]


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
    best = min(timed(lambda: dst.copy_(src), device)[0] for _ in range(repeats))
    return 2 * nbytes / best


def run_group(group: str, shape: Shape, device: str, *, repeats: int = 3, isolate: bool | None = None,
              cases: tuple[str, ...] | None = None, copy_bw: float | None = None) -> list[Row]:
    """Measure every case of ``group`` at ``shape``; one Row per case.

    isolate: one worker process per case (default on the CPU, where peak RSS needs it).
    copy_bw: copy bandwidth in bytes/s for the decoder's bandwidth fraction.
    """
    isolate = device == "cpu" if isolate is None else isolate
    inp = None if isolate else make_inputs(shape, device)
    rows, opened = {}, {}
    for name in cases or CASES[group]:
        row = rows[name] = Row(group, name, shape.size, shape.dtype, device)
        if name == "sparsify":
            row.note = sparsify_note(device)
        args = (group, name, shape, device) if isolate else (group, name, shape, device, inp)
        try:
            opened[name] = open_contender(_setup_case, *args, isolate=isolate)
        except Unavailable as err:
            row.note = f"skipped: {err}"
        except RuntimeError as err:  # includes CUDA out of memory
            row.note = f"failed: {str(err).splitlines()[0]}"
        else:
            row.peak_growth_bytes, row.peak_bytes = opened[name].ready
    try:
        for _ in range(repeats):
            for name, case in list(opened.items()):
                try:
                    rows[name].times_s.append(case.run())
                except RuntimeError as err:
                    rows[name].note = f"failed: {str(err).splitlines()[0]}"
                    rows[name].times_s.clear()
                    case.close()
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


def run_all(device: str, shape_list: list[Shape], *, groups: tuple[str, ...] = GROUPS, repeats: int = 3,
            isolate: bool | None = None, peers: bool = True) -> list[Row]:
    """Every group at every shape (``peers=False``: without sparsify's cases)."""
    copy_bw = copy_bandwidth(device, nbytes=min(1 << 30, 64 * max(decoder_bytes(s) for s in shape_list))) \
        if "decoder" in groups else None
    rows: list[Row] = []
    for shape in shape_list:
        for group in groups:
            cases = tuple(c for c in CASES[group] if peers or c != "sparsify")
            rows += run_group(group, shape, device, repeats=repeats, isolate=isolate, cases=cases, copy_bw=copy_bw)
    return rows


# ---------------------------------------------------------------------------------------------
# Summaries: each contender at its faster dtype; what "auto" picks; acceptance targets.
# ---------------------------------------------------------------------------------------------


def faster_settings(rows: list[Row], auto_dtype: str) -> list[dict[str, Any]]:
    """Per (size, group): each case's faster dtype, and ours at its faster dtype against each
    other case at its own faster one (speedup = their time / ours). ``auto`` says how our time
    in the dtype ``precision = "auto"`` picks here compares with our faster one (1.0 = it is
    the faster)."""
    out = []
    for size, group in dict.fromkeys((r.shape, r.group) for r in rows):
        timed_rows = [r for r in rows if r.shape == size and r.group == group and r.time_s]
        best: dict[str, Row] = {}
        for r in timed_rows:
            if r.case not in best or r.time_s < best[r.case].time_s:
                best[r.case] = r
        if OURS not in best:
            continue
        ours = best[OURS]
        at_auto = next((r for r in timed_rows if r.case == OURS and r.dtype == auto_dtype), None)
        out.append({
            "shape": size, "group": group,
            "best_dtype": {case: r.dtype for case, r in best.items()},
            "ours_vs_best_of": {case: r.time_s / ours.time_s for case, r in best.items() if case != OURS},
            "auto_dtype": auto_dtype,
            "auto_over_best": None if at_auto is None else at_auto.time_s / ours.time_s,
        })
    return out


GIB = 1 << 30


def check_targets(rows: list[Row], device: str) -> list[str]:
    """One PASS/FAIL line per target that the measured rows cover.

    CPU: encoder time <= 1.5x the bare GEMM and peak growth < 1.5 GiB.
    CUDA: encoder throughput >= 85% of the bare GEMM; decoder >= 70 % of a measured copy
    bandwidth; forward+backward >= 3x faster than sparsify with less peak memory.
    """
    lines = []
    for label in dict.fromkeys(f"{r.shape} {r.dtype}" for r in rows):
        got = {(r.group, r.case): r for r in rows if f"{r.shape} {r.dtype}" == label}
        enc = got.get(("encoder", OURS))
        if enc is not None and enc.ratio is not None:
            if device == "cpu":
                lines.append(_verdict(label, "encoder time / GEMM <= 1.5", enc.ratio, enc.ratio <= 1.5))
            else:
                throughput = 1 / enc.ratio
                lines.append(_verdict(label, "encoder GEMM-throughput >= 0.85", throughput, throughput >= 0.85))
        if device == "cpu" and enc is not None and enc.peak_growth_bytes is not None:
            gib = enc.peak_growth_bytes / GIB
            lines.append(_verdict(label, "encoder peak growth < 1.5 GiB", gib, gib < 1.5))
        dec = got.get(("decoder", OURS))
        if device == "cuda" and dec is not None and dec.bandwidth_fraction is not None:
            lines.append(_verdict(label, "decoder copy-bandwidth fraction >= 0.70", dec.bandwidth_fraction,
                                  dec.bandwidth_fraction >= 0.70))
        ours, theirs = got.get(("backward", OURS)), got.get(("backward", "sparsify"))
        if device == "cuda" and ours and theirs and ours.time_s and theirs.time_s:
            speedup = theirs.time_s / ours.time_s
            lines.append(_verdict(label, "fwd+bwd speedup vs sparsify >= 3", speedup, speedup >= 3))
            ours_gib = (ours.peak_growth_bytes or 0) / GIB
            theirs_bytes = math.inf if theirs.peak_growth_bytes is None else theirs.peak_growth_bytes
            less = ours.peak_growth_bytes is not None and ours.peak_growth_bytes < theirs_bytes
            lines.append(_verdict(label, "fwd+bwd peak memory (GiB) < sparsify's", ours_gib, less))
    return lines


def _verdict(label: str, what: str, value: float, ok: bool) -> str:
    return f"{'PASS' if ok else 'FAIL'}  [{label}] {what}: {value:.3f}"


# ---------------------------------------------------------------------------------------------
# Output and the command line.
# ---------------------------------------------------------------------------------------------


def format_rows(rows: list[Row]) -> str:
    """A fixed-width text table, one block per shape and dtype."""
    header = (f"{'group':<9} {'case':<14} {'time ms':>10} {'ratio':>7} {'vs torch':>8} "
              f"{'peak+ MiB':>10} {'peak MiB':>9} {'GB/s':>7} {'of copy':>7}  note")
    lines = []
    for label in dict.fromkeys(f"{r.shape} {r.dtype}" for r in rows):
        lines += ["", f"== {label}", header]
        for r in (r for r in rows if f"{r.shape} {r.dtype}" == label):
            lines.append(
                f"{r.group:<9} {r.case:<14} {fmt(r.time_s, '10.2f', 1e3):>10} {fmt(r.ratio, '7.2f'):>7} "
                f"{fmt(r.speedup_vs_torch, '8.2f'):>8} {fmt(r.peak_growth_bytes, '10.0f', 1 / MIB):>10} "
                f"{fmt(r.peak_bytes, '9.0f', 1 / MIB):>9} {fmt(r.gbps, '7.1f'):>7} "
                f"{fmt(r.bandwidth_fraction, '7.0%'):>7}  {r.note}"
            )
    return "\n".join(lines)


def format_faster(summary: list[dict[str, Any]]) -> str:
    """One line per (shape, group): ours at its faster dtype against each other case at its own."""
    lines = []
    for entry in summary:
        against = ", ".join(f"{case} ({entry['best_dtype'][case]}) {speedup:.2f}x"
                            for case, speedup in entry["ours_vs_best_of"].items())
        auto = "-" if entry["auto_over_best"] is None else f"{entry['auto_over_best']:.2f}x"
        lines.append(f"[{entry['shape']}] {entry['group']}: {OURS} at its faster dtype ({entry['best_dtype'][OURS]}) is "
                     f"faster than each at its own by: {against}; auto picks {entry['auto_dtype']} here, "
                     f"time at auto / at the faster: {auto}")
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-engine bench kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="small", help="small, target, or one size B,d,n,k (e.g. 256,32,1024,8)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: float32,bfloat16")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--peers", choices=["sparsify", "none"], default="sparsify", help="peer cases to run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median kept)")
    parser.add_argument("--in-process", action="store_true",
                        help="every case in this process (default on CUDA; on the CPU peak memory then mixes cases)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    args.dtype_list = tuple(args.dtypes.split(","))
    bad = [d for d in args.dtype_list if d not in DTYPES]
    if bad:
        parser.error(f"--dtypes: unknown {bad}; choose from {list(DTYPES)}")
    try:
        args.shape_list = shapes(args.device, args.shape, args.dtype_list)
    except ValueError as err:
        parser.error(str(err))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the table; print it (or one JSON object with --json)."""
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sae-engine bench kernels: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    info = machine_info(args.device, ("eai-sparsify",))
    rows = run_all(args.device, args.shape_list, groups=tuple(args.groups), repeats=args.repeats,
                   isolate=False if args.in_process else None, peers=args.peers != "none")
    faster = faster_settings(rows, PRECISION_DTYPE[info["auto_precision"]])
    targets = check_targets(rows, args.device)
    if args.json:
        print_json({"suite": "kernels", "machine": info, "rows": [asdict(r) for r in rows],
                    "faster_settings": faster, "targets": targets})
        return 0
    print(machine_line(info))
    print("ratio = time / baseline (encoder: bare GEMM into a preallocated output; decoder: embedding_bag; "
          "backward: dense torch); vs torch = torch time / time; peak+ = peak memory above the level before the call")
    print(format_rows(rows))
    print("\n" + format_faster(faster))
    if targets:
        print("\n" + "\n".join(targets))
    return 0
