"""Triton kernels for TopK sparse autoencoders (and the Matryoshka prefix decode and the
JumpReLU threshold encoder), and their launchers.

Conventions: activations ``x[B, d]``; encoder ``W[n, d]`` and decoder ``W_dec[n, d]``
hold one row per latent; a sparse code is ``(values[B, k], indices[B, k])`` where
an index of -1 marks an empty slot that every kernel skips. Inputs may be fp32,
bf16 or fp16; every kernel accumulates in fp32. No kernel materialises a
``[B, n]`` tensor.

Launchers are pure functions of tensors. Each kernel is a :class:`Kernel` holding
two handles of one source: compiled for CUDA tensors, and run by Triton's
interpreter for CPU tensors. The handle is chosen per call from the tensors'
device; ``TRITON_INTERPRET`` plays no part and is never set.

:mod:`sae_kernels.aot` compiles these kernels ahead of time, at the launchers' block
sizes, and reads their registers and machine code.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .validate import MAX_TRITON_K

# Largest padded k (next power of two of k) the fused encoder keeps in registers.
MAX_K_PAD = MAX_TRITON_K

# Packed key of (-inf, latent 2**32-1), the smallest key a real candidate can have.
# -inf is 0xFF800000, whose order-preserving int32 key is -(2**31) + 0x7FFFFF.
_FLOOR_KEY = tl.constexpr((-(2**31) + 0x7FFFFF) << 32)
_MAX_KEY = tl.constexpr(2**63 - 1)


def _language_objects() -> list[Any]:
    """What the interpreter patches while it runs: triton.language's modules and their classes."""
    modules = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m]
    classes = {id(v): v for m in modules for v in vars(m).values()
               if isinstance(v, type) and v.__module__.startswith("triton.language")}
    return modules + list(classes.values())


@contextlib.contextmanager
def _interpreting() -> Iterator[None]:
    """Scope of one interpreted launch in a process whose ``triton.language`` was built compiled.

    ``tl.max``, ``tl.sum``, ``tl.cdiv`` ... are themselves ``@triton.jit`` functions, built as
    compiled ``JITFunction`` objects when triton was imported without ``TRITON_INTERPRET``, and
    a ``JITFunction`` refuses a direct call. Inside this scope such a call runs the function as
    the interpreter runs its own device functions. The interpreter patches ``triton.language``
    while it runs and does not undo every patch of a nested call, so every replaced attribute
    is put back afterwards: kernels compiled later see the language as it was. The patching is
    process-wide, so callers hold ``_INTERPRETER_LOCK``.
    """
    saved = [(obj, dict(vars(obj))) for obj in _language_objects()]
    call = JITFunction.__call__

    def interpreted_call(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
        handle = _DEVICE_FUNCTIONS.get(self.fn)
        if handle is None:
            handle = _DEVICE_FUNCTIONS[self.fn] = InterpretedFunction(self.fn)
        return handle(*args, **kwargs)

    JITFunction.__call__ = interpreted_call
    try:
        yield
    finally:
        JITFunction.__call__ = call
        # Names the interpreter adds (its helpers, which rewritten functions look up) stay.
        for obj, before in saved:
            now = vars(obj)
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    setattr(obj, key, value)


_INTERPRETER_LOCK = threading.Lock()
_DEVICE_FUNCTIONS: dict[Any, InterpretedFunction] = {}
_MISSING = object()


class Kernel:
    """One Triton kernel with both launch handles: ``compiled`` (a ``JITFunction``) for GPU
    tensors and ``interpreted`` (Triton's interpreter, NumPy on the host) for CPU tensors.

    ``triton.jit`` builds one or the other depending on ``TRITON_INTERPRET`` at decoration
    time; holding both lets one process run either, chosen per call by :meth:`launch`.
    Interpreted launches run one at a time (see :func:`_interpreting`).
    """

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.compiled = JITFunction(fn)
        self.interpreted = InterpretedFunction(fn)

    @property
    def __name__(self) -> str:
        return self.fn.__name__

    def launch(self, grid: tuple[int, ...], device: torch.device, *args: Any, **kwargs: Any) -> None:
        """Run on ``grid``: compiled for tensors on a GPU, interpreted for CPU tensors."""
        if device.type != "cpu":
            self.compiled[grid](*args, **kwargs)
            return
        with _INTERPRETER_LOCK, _interpreting():
            self.interpreted[grid](*args, **kwargs)


# --------------------------------------------------------------------------- encoder


@Kernel
def _encode_topk_kernel(
    X, W, Bias, Cand,
    B, n, d, k, tiles_per_split,
    HAS_BIAS: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr = False,
):
    """Fused ``x @ W.T + bias`` and running per-row top-k.

    Grid ``(cdiv(B, BLOCK_M), splits)``: program ``(m, s)`` owns rows
    ``m*BLOCK_M ...`` and the contiguous latent tiles ``s*tiles_per_split ...``.
    For each ``[BLOCK_M, BLOCK_N]`` tile it runs the GEMM over ``d`` in
    ``BLOCK_K`` chunks (fp32 accumulator), adds the bias and packs values and
    latent ids into int64 keys, so pre-activations never leave registers.

    The running set holds ``k`` distinct keys per row (in ``K_PAD`` slots; the
    slots past ``k`` are pinned to the largest key). A tile is merged by
    repeatedly moving each row's best remaining key into the slot of its
    current k-th best while it beats it. The loop runs as many times as the
    most-improved row in the block needs: about k times on the first tile and a
    few times later on, once the k-th best is high; a tile with nothing above
    the k-th best costs one max-reduction. Writes the k keys, unsorted, to
    ``Cand[s, rows, :k]`` and the lowest key to ``Cand[s, rows, k:K_PAD]``; the
    launcher merges and sorts the splits. Latents ``>= n`` are padded with -inf. ``DOT_FP32`` upcasts the operands
    before ``tl.dot`` (exact for bf16 products); only the CPU interpreter needs
    it, as its ``tl.dot`` multiplies the raw bf16 storage as integers.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * d + offs_k[None, :]

    slot = tl.arange(0, K_PAD).to(tl.int64)[None, :]
    # Distinct -inf placeholders (fake ids 2**32-1-slot) so exactly one slot holds the minimum.
    running = tl.where(slot < k, _FLOOR_KEY + slot, _MAX_KEY) + tl.zeros([BLOCK_M, K_PAD], tl.int64)
    kth = tl.min(running, axis=1)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for t in range(tile_lo, tile_hi):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        # int64 row offsets: n * d can exceed 2**31 for wide dictionaries.
        w_ptrs = W + cols.to(tl.int64)[:, None] * d + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            k_ok = offs_k < d - k0
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_FP32:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + cols, mask=col_ok, other=0.0)[None, :]
        acc = tl.where(col_ok[None, :], acc, float("-inf"))
        # Pack value and latent id into one int64 key. High 32 bits: the float's bits mapped
        # to a signed int that orders like the float (+0.0 turns -0.0 into +0.0 so both zeros
        # compare equal, as in torch). Low 32 bits: 2**32 - 1 - col, so among equal values
        # the smaller latent id wins. One integer comparison then orders by value, ties by
        # index, so plain max/min reductions select a value together with its index.
        bits = (acc + 0.0).to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        keys = (ordered.to(tl.int64) << 32) | (cols.to(tl.int64)[None, :] ^ 0xFFFFFFFF)
        # Rows past B get keys no better than any placeholder, so they never insert.
        keys = tl.where(row_ok[:, None], keys, _FLOOR_KEY)
        best = tl.max(keys, axis=1)
        while tl.max((best > kth).to(tl.int32), axis=0) > 0:
            # Keys are unique per row, so each equality below selects exactly one slot.
            ins = (best > kth)[:, None] & (running == kth[:, None])
            running = tl.where(ins, best[:, None], running)
            keys = tl.where(keys == best[:, None], _FLOOR_KEY, keys)
            best = tl.max(keys, axis=1)
            kth = tl.min(running, axis=1)

    out_ptrs = Cand + (pid_s * B + rows.to(tl.int64))[:, None] * K_PAD + slot
    tl.store(out_ptrs, tl.where(slot < k, running, _FLOOR_KEY), mask=row_ok[:, None])


@dataclass(frozen=True)
class EncodeConfig:
    """Tile sizes of ``_encode_topk_kernel`` for one dtype and padded k."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def encode_config(dtype: torch.dtype, k_pad: int) -> EncodeConfig:
    """Block sizes used by :func:`encode_topk` (and by :mod:`sae_kernels.aot`).

    The running set (``BLOCK_M x K_PAD`` int64 keys) lives in registers next to
    the ``BLOCK_M x BLOCK_N`` tile, so the row block shrinks as ``K_PAD`` grows.
    """
    if k_pad > MAX_K_PAD:
        raise ValueError(f"fused Triton top-k supports k <= {MAX_K_PAD}, got padded k {k_pad}")
    if dtype == torch.float32:
        # 3xTF32 keeps three operand splits live, so fp32 uses narrower tiles.
        if k_pad <= 64:
            return EncodeConfig(64, 64, 16, 8, 3)
        return EncodeConfig(32, 64, 32, 8, 3)
    if k_pad <= 128:
        return EncodeConfig(64, 128, 64, 8, 3)
    return EncodeConfig(32, 128, 64, 8, 3)


@dataclass(frozen=True)
class EncodePlan:
    """Everything needed to launch ``_encode_topk_kernel`` (also from JAX via jax_triton).

    The kernel writes int64 packed keys to a ``[splits, B, K_PAD]`` buffer,
    ``Cand``; ``constexprs`` are the kernel's compile-time keyword arguments.
    """

    grid: tuple[int, int]
    splits: int
    tiles_per_split: int
    k_pad: int
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


def encode_plan(
    B: int, n: int, k: int, dtype: torch.dtype, num_sms: int | None,
    *, has_bias: bool = True, interpreted: bool = False,
) -> EncodePlan:
    """Tile sizes, grid and latent splits of the fused encoder.

    ``num_sms`` (None under the interpreter) sets the split count so the grid
    holds about four programs per SM: several waves keep the tail small, and
    each split still sweeps many tiles, so its k-th best rises quickly and later
    tiles insert few keys. ``interpreted`` selects the interpreter's bf16 dot
    workaround (``DOT_FP32``).

    Raises:
        ValueError: if ``next_pow2(k) > MAX_K_PAD``.
    """
    k_pad = triton.next_power_of_2(k)
    cfg = encode_config(dtype, k_pad)
    tiles = triton.cdiv(n, cfg.block_n)
    row_blocks = triton.cdiv(B, cfg.block_m)
    target = 4 * num_sms if num_sms is not None else 4
    splits = max(1, min(tiles, triton.cdiv(target, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)  # no empty splits
    return EncodePlan(
        grid=(row_blocks, splits),
        splits=splits,
        tiles_per_split=tiles_per_split,
        k_pad=k_pad,
        constexprs={
            "HAS_BIAS": has_bias, "K_PAD": k_pad,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            # fp32: the 3xTF32 split, as accurate as fp32 (about 1e-6 relative).
            "INPUT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
            "DOT_FP32": interpreted and dtype == torch.bfloat16,
        },
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is not free)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the encoder kernel's key packing: int64 keys -> (fp32 values, int64 latent ids)."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def encode_topk(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row top-k of ``x @ W.T + bias`` without forming the ``[B, n]`` matrix.

    Args:
        x: ``[B, d]`` activations, fp32/bf16/fp16.
        W: ``[n, d]`` encoder weights, same dtype as ``x``.
        bias: ``[n]`` fp32 (may hold -inf to mask latents out), or None.
        k: number of latents per row, ``1 <= k``, ``next_pow2(k) <= MAX_K_PAD``.
            fp32 inputs multiply with the 3xTF32 split (as accurate as fp32).

    Returns:
        ``pre[B, k]`` fp32 pre-activations sorted descending, ties broken by the
        smaller latent index, and ``idx[B, k]`` int64 latent ids; slots whose
        value is -inf (fewer than k finite candidates) carry index -1.

    Raises:
        ValueError: if ``next_pow2(k) > MAX_K_PAD``.
    """
    B, d = x.shape
    n = W.shape[0]
    if B == 0:
        return torch.empty((0, k), dtype=torch.float32, device=x.device), \
            torch.empty((0, k), dtype=torch.int64, device=x.device)
    interpreted = x.device.type == "cpu"
    num_sms = None if interpreted else _sm_count(
        torch.cuda.current_device() if x.device.index is None else x.device.index)
    plan = encode_plan(B, n, k, x.dtype, num_sms, has_bias=bias is not None,
                       interpreted=interpreted)
    x = x.contiguous()
    W = W.contiguous()
    cand = torch.empty((plan.splits, B, plan.k_pad), dtype=torch.int64, device=x.device)
    _encode_topk_kernel.launch(
        plan.grid, x.device,
        x, W, bias.contiguous() if bias is not None else x, cand,
        B, n, d, k, plan.tiles_per_split,
        **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    # The cross-split merge is tiny ([B, splits*K_PAD] keys); topk also sorts.
    merged = torch.topk(cand.permute(1, 0, 2).reshape(B, plan.splits * plan.k_pad), k, dim=1).values
    pre, idx = _unpack_keys(merged)
    idx = torch.where(pre == float("-inf"), -1, idx)
    return pre, idx


# --------------------------------------------------------------------------- decoder


@Kernel
def _decode_kernel(
    V, I, W, Out, k, d,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``Out[b, dblock] = sum_j V[b, j] * W[I[b, j], dblock]``, skipping ``I < 0``.

    Grid ``(B, cdiv(d, BLOCK_D))``. Gathers ``BLOCK_J`` rows of ``W`` at a time
    (embedding-bag style), fp32 accumulation in a fixed order (deterministic).
    """
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(0, k, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < k
        lat = tl.load(I + row * k + offs_j, mask=j_ok, other=-1).to(tl.int64)
        v = tl.load(V + row * k + offs_j, mask=j_ok, other=0.0).to(tl.float32)
        live = lat >= 0
        w = tl.load(W + lat[:, None] * d + offs_d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    tl.store(Out + row * d + offs_d, acc.to(Out.dtype.element_ty), mask=d_ok)


_DECODE_BLOCK_J = 32
_DECODE_BLOCK_D = 256
_DECODE_WARPS = 4


def decode(values: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Sparse decode ``out[b] = sum_j values[b, j] * W[idx[b, j]]``, skipping ``idx < 0``.

    Args:
        values: ``[B, k]`` float.
        idx: ``[B, k]`` integer latent ids, -1 for empty slots.
        W: ``[n, d]`` decoder weights.

    Returns:
        ``[B, d]`` of dtype ``promote_types(values.dtype, W.dtype)`` (fp32 accumulation).
    """
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty((B, d), dtype=torch.promote_types(values.dtype, W.dtype), device=W.device)
    if B == 0:
        return out
    block_j = min(_DECODE_BLOCK_J, triton.next_power_of_2(k))
    _decode_kernel.launch(
        (B, triton.cdiv(d, _DECODE_BLOCK_D)), W.device,
        values.contiguous(), idx.contiguous(), W.contiguous(), out, k, d,
        BLOCK_J=block_j, BLOCK_D=_DECODE_BLOCK_D, num_warps=_DECODE_WARPS,
    )
    return out


# --------------------------------------------------------------------------- backward


@Kernel
def _gather_dot_kernel(
    G, I, W, Out, k, d,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``Out[b, j] = dot(G[b], W[I[b, j]])``, 0 where ``I < 0``.

    Grid ``(B, cdiv(k, BLOCK_J))``: the gradient of :func:`decode` with respect
    to its values. Loops over ``d`` in ``BLOCK_D`` chunks with an fp32 accumulator.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = offs_j < k
    lat = tl.load(I + row * k + offs_j, mask=j_ok, other=-1).to(tl.int64)
    live = lat >= 0
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        d_ok = offs_d < d - d0
        g = tl.load(G + row * d + d0 + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        w = tl.load(W + lat[:, None] * d + d0 + offs_d[None, :], mask=live[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(Out + row * k + offs_j, acc, mask=j_ok)


_GATHER_BLOCK_J = 32
_GATHER_BLOCK_D = 128
_GATHER_WARPS = 4


def gather_dot(g: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[b, j] = dot(g[b], W[idx[b, j]])``, 0 where ``idx < 0``.

    Args:
        g: ``[B, d]`` float (e.g. the gradient of the reconstruction).
        idx: ``[B, k]`` integer latent ids, -1 for empty slots.
        W: ``[n, d]``.

    Returns:
        ``[B, k]`` float32.
    """
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty((B, k), dtype=torch.float32, device=W.device)
    if B == 0 or k == 0:
        return out
    block_j = min(_GATHER_BLOCK_J, triton.next_power_of_2(k))
    _gather_dot_kernel.launch(
        (B, triton.cdiv(k, block_j)), W.device,
        g.contiguous(), idx.contiguous(), W.contiguous(), out, k, d,
        BLOCK_J=block_j, BLOCK_D=_GATHER_BLOCK_D, num_warps=_GATHER_WARPS,
    )
    return out


@Kernel
def _segment_rows_kernel(
    Coeff, Order, Starts, Ends, Src, Out, Sums, k, d,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Segmented reduction ``Out[u] = sum_{p in segment u} Coeff[p] * Src[p // k]``.

    Grid ``(U, cdiv(d, BLOCK_D))``. ``Order`` holds flat code positions
    ``b*k + j`` sorted by latent; segment ``u`` is ``Order[Starts[u]:Ends[u]]``.
    Sums in a fixed order with no atomics, so results are bitwise reproducible.
    ``Sums[u]`` gets the sum of the coefficients.
    """
    seg = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(Starts + seg)
    end = tl.load(Ends + seg)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    csum = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        p_ok = offs_p < end
        pos = tl.load(Order + offs_p, mask=p_ok, other=0)
        c = tl.load(Coeff + pos, mask=p_ok, other=0.0).to(tl.float32)
        src_row = pos // k
        s = tl.load(Src + src_row[:, None] * d + offs_d[None, :], mask=p_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(s.to(tl.float32) * c[:, None], axis=0)
        csum += c
    tl.store(Out + seg.to(tl.int64) * d + offs_d, acc, mask=d_ok)
    if pid_d == 0:
        tl.store(Sums + seg, tl.sum(csum, axis=0))


_SEGMENT_BLOCK_P = 16
_SEGMENT_BLOCK_D = 256
_SEGMENT_WARPS = 4


def _segments(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group flat code positions by latent: (rows[U], order[P], starts[U], ends[U]), all int64.

    Stable sort so positions within a segment stay in ascending (b, j) order,
    which fixes the summation order.
    """
    flat = idx.reshape(-1).to(torch.int64)
    pos = torch.nonzero(flat >= 0).squeeze(1)
    lat_sorted, perm = torch.sort(flat[pos], stable=True)
    rows, counts = torch.unique_consecutive(lat_sorted, return_counts=True)
    ends = torch.cumsum(counts, 0)
    return rows, pos[perm], ends - counts, ends


def segment_rows(
    coeff: torch.Tensor, idx: torch.Tensor, src: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse-transpose product: per latent, the coefficient-weighted sum of source rows.

    ``grads[u] = sum_{(b, j): idx[b, j] == rows[u]} coeff[b, j] * src[b]`` and
    ``coeff_sums[u] = sum of those coeff``; ``idx < 0`` is ignored. With
    ``coeff = dL/dvalues`` and ``src = x`` this is the touched rows of ``dW_enc``
    (and ``coeff_sums`` is ``db_enc``); with ``coeff = values`` and
    ``src = dL/dout`` it is ``dW_dec``. Deterministic (sorted segments, no atomics).

    Args:
        coeff: ``[B, k]`` float.
        idx: ``[B, k]`` integer latent ids, -1 for empty slots.
        src: ``[B, d]`` float.

    Returns:
        ``rows[U]`` int64 ascending unique latent ids, ``grads[U, d]`` float32,
        ``coeff_sums[U]`` float32.
    """
    k = idx.shape[1]
    d = src.shape[1]
    rows, order, starts, ends = _segments(idx)
    U = rows.numel()
    grads = torch.empty((U, d), dtype=torch.float32, device=src.device)
    sums = torch.empty((U,), dtype=torch.float32, device=src.device)
    if U > 0:
        _segment_rows_kernel.launch(
            (U, triton.cdiv(d, _SEGMENT_BLOCK_D)), src.device,
            coeff.contiguous(), order, starts, ends, src.contiguous(), grads, sums, k, d,
            BLOCK_P=_SEGMENT_BLOCK_P, BLOCK_D=_SEGMENT_BLOCK_D, num_warps=_SEGMENT_WARPS,
        )
    return rows, grads, sums


# --------------------------------------------------------------------------- Matryoshka prefix decode


@Kernel
def _prefix_decode_kernel(
    V, I, Ends, W, Out, B, k, d, G,
    BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Running sums of one row's code, emitted at the prefix boundaries.

    ``V``, ``I``: ``[B, k]`` with each row sorted by latent index (empty slots first);
    ``Ends``: ``[B, G + 1]``, group ``g`` of row ``b`` is ``Ends[b, g] : Ends[b, g + 1]``.
    Grid ``(B, cdiv(d, BLOCK_D))``: one pass over the row's slots in index order, storing the
    fp32 running sum to ``Out[g, b]`` after group ``g`` (cumulative over groups).
    """
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    lo = tl.load(Ends + row * (G + 1))
    for g in range(0, G):
        hi = tl.load(Ends + row * (G + 1) + g + 1)
        for j0 in range(lo, hi, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            j_ok = offs_j < hi
            lat = tl.load(I + row * k + offs_j, mask=j_ok, other=0).to(tl.int64)
            v = tl.load(V + row * k + offs_j, mask=j_ok, other=0.0).to(tl.float32)
            w = tl.load(W + lat[:, None] * d + offs_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
        tl.store(Out + (g * B + row) * d + offs_d, acc.to(Out.dtype.element_ty), mask=d_ok)
        lo = hi


_PREFIX_BLOCK_J = 32
_PREFIX_BLOCK_D = 256
_PREFIX_WARPS = 4


def prefix_decode(
    values: torch.Tensor, idx: torch.Tensor, W: torch.Tensor, boundaries: list[int]
) -> torch.Tensor:
    """Matryoshka partial reconstructions ``out[g, b] = sum_{j: idx[b, j] < m_g} values[b, j] W[idx[b, j]]``.

    Args:
        values: ``[B, k]`` float.
        idx: ``[B, k]`` integer latent ids, -1 for empty slots.
        W: ``[n, d]`` decoder weights.
        boundaries: prefix sizes ``m_1 < ... < m_G = n``.

    Returns:
        ``[G, B, d]`` of dtype ``promote_types(values.dtype, W.dtype)`` (fp32 running sums).
    """
    from .chunked import sort_code_by_index

    B, k = idx.shape
    G, d = len(boundaries), W.shape[1]
    out = torch.zeros((G, B, d), dtype=torch.promote_types(values.dtype, W.dtype), device=W.device)
    if B == 0 or k == 0:
        return out
    svals, sidx, ends = sort_code_by_index(values, idx.to(torch.int64), boundaries)
    block_j = min(_PREFIX_BLOCK_J, triton.next_power_of_2(k))
    _prefix_decode_kernel.launch(
        (B, triton.cdiv(d, _PREFIX_BLOCK_D)), W.device,
        svals.contiguous(), sidx.contiguous(), ends.contiguous(), W.contiguous(), out, B, k, d, G,
        BLOCK_J=block_j, BLOCK_D=_PREFIX_BLOCK_D, num_warps=_PREFIX_WARPS,
    )
    return out


# --------------------------------------------------------------------------- JumpReLU threshold encode


_NO_COLUMN = tl.constexpr(2**31 - 1)


@triton.jit
def _append_in_index_order(
    mask, acc, cols, stored, cap, Vals, Idx, out_row, row_ok,
):
    """Append each row's masked entries of a tile, smallest column first, to its list.

    ``mask``, ``acc``: ``[BLOCK_M, BLOCK_N]``; ``stored``: ``[BLOCK_M]`` entries already in
    each row's list ``Vals[out_row, :cap]`` / ``Idx[out_row, :cap]``. One entry per row per
    round, for as many rounds as the fullest row needs (entries past ``cap`` are dropped), so
    only ``[BLOCK_M]`` vectors of pointers are live: scattering the whole tile at once would
    need a 64-bit pointer per element, and spill. Returns the new ``stored``.
    """
    cand = tl.where(mask & (stored < cap)[:, None], cols[None, :], _NO_COLUMN)
    first = tl.min(cand, axis=1)
    while tl.min(first, axis=0) < _NO_COLUMN:
        ok = (first < _NO_COLUMN) & row_ok
        hit = cand == first[:, None]
        value = tl.sum(tl.where(hit, acc, 0.0), axis=1)
        offs = out_row * cap + stored
        tl.store(Vals + offs, value, mask=ok)
        tl.store(Idx + offs, first, mask=ok)
        stored += ok.to(tl.int32)
        cand = tl.where(hit | (stored >= cap)[:, None], _NO_COLUMN, cand)
        first = tl.min(cand, axis=1)
    return stored


@Kernel
def _threshold_encode_kernel(
    X, W, Bias, Thr, Vals, Idx, Cnt, BandPre, BandIdx, BandCnt,
    B, n, d, cap, band_cap, half_band, tiles_per_split,
    HAS_BAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr = False,
):
    """Fused ``pre = x @ W.T + bias``, the compare ``pre > Thr`` and per-row compaction.

    Grid ``(cdiv(B, BLOCK_M), splits)``: program ``(m, s)`` owns rows ``m*BLOCK_M ...`` and
    the contiguous latent tiles ``s*tiles_per_split ...``. Each tile's active latents are
    appended in index order to the row's list ``Vals[s, row, :cap]`` / ``Idx[s, row, :cap]``
    (``_append_in_index_order``: about as many rounds as the row with the most active latents
    in the tile has, usually 0-2); ``Cnt[s, row]`` gets the exact count, which may exceed
    ``cap``. With ``HAS_BAND`` the latents with ``|pre - Thr| < half_band`` go to ``BandPre`` /
    ``BandIdx`` / ``BandCnt`` the same way (up to ``band_cap``). Pre-activations never leave
    registers except for listed entries; the launcher concatenates the splits.
    ``DOT_FP32``: as in ``_encode_topk_kernel``.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * d + offs_k[None, :]
    out_row = pid_s * B + rows.to(tl.int64)  # row of the [splits, B] lists
    count = tl.zeros([BLOCK_M], dtype=tl.int32)
    stored = tl.zeros([BLOCK_M], dtype=tl.int32)
    band_count = tl.zeros([BLOCK_M], dtype=tl.int32)
    band_stored = tl.zeros([BLOCK_M], dtype=tl.int32)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(n, BLOCK_N))
    for t in range(tile_lo, tile_hi):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        w_ptrs = W + cols.to(tl.int64)[:, None] * d + offs_k[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_K):
            k_ok = offs_k < d - k0
            xt = tl.load(x_ptrs + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptrs + k0, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if DOT_FP32:
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
        acc += tl.load(Bias + cols, mask=col_ok, other=0.0)[None, :]
        thr = tl.load(Thr + cols, mask=col_ok, other=0.0)[None, :]
        live = row_ok[:, None] & col_ok[None, :]
        active = (acc > thr) & live
        count += tl.sum(active.to(tl.int32), axis=1)
        stored = _append_in_index_order(active, acc, cols, stored, cap, Vals, Idx, out_row, row_ok)
        if HAS_BAND:
            near = (tl.abs(acc - thr) < half_band) & live
            band_count += tl.sum(near.to(tl.int32), axis=1)
            band_stored = _append_in_index_order(near, acc, cols, band_stored, band_cap, BandPre, BandIdx,
                                                 out_row, row_ok)
    tl.store(Cnt + out_row, count, mask=row_ok)
    if HAS_BAND:
        tl.store(BandCnt + out_row, band_count, mask=row_ok)


def threshold_config(dtype: torch.dtype) -> EncodeConfig:
    """Block sizes of ``_threshold_encode_kernel`` (used by :func:`threshold_encode` and
    :mod:`sae_kernels.aot`): the top-k encoder's tiles for small k, as nothing else but the
    ``BLOCK_M x BLOCK_N`` tile and its prefix counts lives in registers."""
    return encode_config(dtype, 32)


@dataclass(frozen=True)
class ThresholdPlan:
    """Grid, latent splits and compile-time arguments of ``_threshold_encode_kernel``."""

    grid: tuple[int, int]
    splits: int
    tiles_per_split: int
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int


def threshold_plan(
    B: int, n: int, dtype: torch.dtype, num_sms: int | None, *, has_band: bool, interpreted: bool = False
) -> ThresholdPlan:
    """Tiles and splits of the threshold encoder: about four programs per SM, as the top-k
    encoder; the per-split lists take ``splits x [B, cap]`` (and band) entries."""
    cfg = threshold_config(dtype)
    tiles = triton.cdiv(n, cfg.block_n)
    row_blocks = triton.cdiv(B, cfg.block_m)
    target = 4 * num_sms if num_sms is not None else 4
    splits = max(1, min(tiles, triton.cdiv(target, row_blocks)))
    tiles_per_split = triton.cdiv(tiles, splits)
    splits = triton.cdiv(tiles, tiles_per_split)
    return ThresholdPlan(
        grid=(row_blocks, splits), splits=splits, tiles_per_split=tiles_per_split,
        constexprs={
            "HAS_BAND": has_band,
            "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
            "INPUT_PRECISION": "tf32x3" if dtype == torch.float32 else "tf32",
            "DOT_FP32": interpreted and dtype == torch.bfloat16,
        },
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _concat_splits(
    vals: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, cap: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate per-split lists in split (= index) order, truncated to ``cap``.

    vals [S, B, cap] fp32, idx [S, B, cap] int32, cnt [S, B] int32 (exact, may exceed cap) ->
    (values [B, cap] fp32, indices [B, cap] int64, counts [B] int64); unused slots 0 / -1.
    """
    S, B, _ = vals.shape
    kept = cnt.clamp(max=cap).to(torch.int64)
    pos = (torch.cumsum(kept, 0) - kept)[:, :, None] + torch.arange(cap, device=vals.device)
    ok = (torch.arange(cap, device=vals.device) < kept[:, :, None]) & (pos < cap)
    rows = torch.arange(B, device=vals.device)[None, :, None].expand_as(pos)
    values = torch.zeros(B, cap, dtype=torch.float32, device=vals.device)
    indices = torch.full((B, cap), -1, dtype=torch.int64, device=vals.device)
    values[rows[ok], pos[ok]] = vals[ok]
    indices[rows[ok], pos[ok]] = idx[ok].to(torch.int64)
    return values, indices, cnt.sum(0, dtype=torch.int64)


def threshold_encode(
    x: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor,
    threshold: torch.Tensor,
    cap: int,
    band: float | None,
    band_cap: int,
) -> tuple[torch.Tensor, ...]:
    """Active latents ``pre > threshold`` of ``pre = x @ W.T + bias`` without forming ``[B, n]``.

    Args:
        x: ``[B, d]`` activations, fp32/bf16/fp16; W: ``[n, d]``, same dtype.
        bias, threshold: ``[n]`` fp32.
        cap: active latents kept per row (the lowest indices); band: width of the band
            ``|pre - threshold| < band / 2`` to report, or None; band_cap: band entries per row.

    Returns:
        ``(values [B, cap] fp32, indices [B, cap] int64, counts [B] int64, band_pre
        [B, band_cap] fp32, band_indices [B, band_cap] int64, band_counts [B] int64)``, each
        list in ascending index order, unused slots 0 / -1; without a band the band lists have
        width 0 and the counts are 0.
    """
    B, d = x.shape
    n = W.shape[0]
    dev = x.device
    has_band = band is not None
    width = band_cap if has_band else 0
    interpreted = dev.type == "cpu"
    num_sms = None if interpreted else _sm_count(torch.cuda.current_device() if dev.index is None else dev.index)
    plan = threshold_plan(B, n, x.dtype, num_sms, has_band=has_band, interpreted=interpreted)
    S = plan.splits
    vals = torch.empty((S, B, cap), dtype=torch.float32, device=dev)
    idx = torch.empty((S, B, cap), dtype=torch.int32, device=dev)
    cnt = torch.empty((S, B), dtype=torch.int32, device=dev)
    bvals = torch.empty((S, B, max(width, 1)), dtype=torch.float32, device=dev)
    bidx = torch.empty((S, B, max(width, 1)), dtype=torch.int32, device=dev)
    bcnt = torch.zeros((S, B), dtype=torch.int32, device=dev)
    if B > 0:
        _threshold_encode_kernel.launch(
            plan.grid, dev,
            x.contiguous(), W.contiguous(), bias.contiguous(), threshold.contiguous(),
            vals, idx, cnt, bvals, bidx, bcnt,
            B, n, d, cap, max(width, 1), float(band) / 2 if has_band else 0.0, plan.tiles_per_split,
            **plan.constexprs, num_warps=plan.num_warps, num_stages=plan.num_stages,
        )
    else:
        cnt.zero_()
    values, indices, counts = _concat_splits(vals, idx, cnt, cap)
    band_pre, band_idx, band_counts = _concat_splits(bvals[..., :width], bidx[..., :width], bcnt, width)
    return values, indices, counts, band_pre, band_idx, band_counts
