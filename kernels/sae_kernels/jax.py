"""JAX versions of the sparse-autoencoder kernels: top-k encode and sparse decode, and for
Matryoshka and JumpReLU SAEs the prefix decode and the threshold encoder (XLA path only;
semantics as in ``sae_kernels.prefix_decode`` / ``sae_kernels.threshold_encode``, with int32
indices and counts).

Conventions (the same as the PyTorch API):

* ``x[B, d]``; ``W_enc[n, d]`` and ``W_dec[n, d]`` hold one row per latent; ``b_enc[n]``.
* A sparse code is ``(values[B, k], indices[B, k])``. ``indices`` are int32 (JAX's default
  integer with x64 disabled); index -1 marks an empty slot, whose value is 0 and which every
  function and gradient skips.
* Inputs may be fp32, bf16 or fp16; products are accumulated in fp32.

Selection and ordering (``topk_encode``): per row, the ``k`` largest pre-activations
``x @ W_enc.T + b_enc`` among latents whose ``latent_mask`` entry is True, sorted descending,
then passed through ReLU (a selected latent with a negative pre-activation keeps its index and
gets value 0). Equal pre-activations go to the smaller latent index: on the Triton path by
construction, on the XLA path because XLA's CPU ``top_k`` sorts stably (the tests check this
on exact integer ties); XLA on GPU makes no such promise, so there ``impl="xla"`` orders
exactly equal values as XLA's ``top_k`` does. -0.0 and +0.0 count as equal; NaN ranks above
every number. Slots left over when fewer than ``k`` latents are eligible hold value 0 and
index -1.

Memory: the XLA path never materializes ``[B, n]``. Rows are processed in chunks of static
size (``jax.lax.scan`` over a batch padded to a multiple of the chunk): a chunk's ``[rows, n]``
fp32 pre-activations hold at most ``PREACT_ELEMENTS`` (2**25, 128 MiB) elements, and the
``[rows, k, d]`` gather and scatter operands of the decoder and of the backward passes at
most ``GATHER_ELEMENTS`` (2**20); a single row larger than its budget is processed alone.
Backward passes are sparse: gathers of ``k`` rows per token and scatter-adds into the
``[n, d]`` weight gradients, accumulated in fp32 across chunks (deterministic on CPU).

Implementations (``impl``): ``"xla"`` is the chunked path above, on any backend.
``"triton"`` runs the forward passes with the Triton kernels of ``sae_kernels.triton_kernels``
through ``jax_triton`` (GPU only; backward passes stay on the sparse XLA path). ``"auto"``
picks ``"triton"`` when JAX runs on a GPU, ``jax_triton`` imports, and the call fits the
kernels (encoder: ``x`` and ``W_enc`` of one float dtype, ``next_pow2(k) <= 256``); otherwise
``"xla"``.
"""
from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["topk_encode", "sparse_decode", "prefix_decode", "threshold_encode", "ThresholdCode", "EMPTY"]

EMPTY = -1  # index of an empty slot in a sparse code
# Chunk budgets, in elements. Pre-activations: large enough that each chunk's GEMM reuses
# W_enc over many rows. Gathers and scatter operands: cache-sized, which measured fastest.
PREACT_ELEMENTS = 1 << 25  # [rows, n] fp32: 128 MiB
GATHER_ELEMENTS = 1 << 20  # [rows, k, d] fp32: 4 MiB
_IMPLS = ("auto", "xla", "triton")

Array = jax.Array


# ----------------------------------------------------------------------------- helpers


def _rows_per_chunk(B: int, row_elements: int, budget: int, chunk_rows: int | None) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else as many as fit ``budget`` (1..B)."""
    if chunk_rows is not None:
        return max(1, min(B, chunk_rows))
    return max(1, min(B, budget // max(row_elements, 1)))


def _scan_rows(
    fn: Callable[[object, tuple[Array, ...]], tuple[object, tuple[Array, ...]]],
    carry: object,
    rows: tuple[Array, ...],
    chunk: int,
) -> tuple[object, tuple[Array, ...]]:
    """Apply ``fn(carry, row_chunk) -> (carry, out_chunk)`` over chunks of the leading axis.

    Every array in ``rows`` and in ``fn``'s outputs has the batch as leading axis. The batch is
    padded to a multiple of ``chunk`` (integer arrays with -1, so padded slots are empty; the
    rest with 0, so padded rows add nothing to accumulated gradients) and outputs are cut back.
    """
    B = rows[0].shape[0]
    if chunk >= B:
        return fn(carry, rows)
    n_chunks = -(-B // chunk)
    pad = n_chunks * chunk - B

    def split(a: Array) -> Array:
        fill = EMPTY if jnp.issubdtype(a.dtype, jnp.integer) else 0
        a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
        return a.reshape(n_chunks, chunk, *a.shape[1:])

    carry, outs = lax.scan(fn, carry, tuple(split(a) for a in rows))
    return carry, tuple(o.reshape(n_chunks * chunk, *o.shape[2:])[:B] for o in outs)


def _gather_rows(W: Array, indices: Array) -> tuple[Array, Array]:
    """Rows ``W[indices]`` as fp32 ``[..., d]`` (empty slots read row 0) and the validity mask."""
    valid = indices >= 0
    return jnp.take(W, jnp.where(valid, indices, 0), axis=0).astype(jnp.float32), valid


def _scatter_rows(acc: Array, indices: Array, updates: Array) -> Array:
    """``acc[indices[i]] += updates[i]`` over the leading axes; empty slots (-1) are dropped.

    acc: [n, ...] fp32, indices: [R, k], updates: [R, k, ...] fp32.
    """
    n = acc.shape[0]
    # -1 would wrap to the last row under NumPy indexing; n is out of range and gets dropped.
    target = jnp.where(indices >= 0, indices, n)
    return acc.at[target].add(updates, mode="drop")


def _choose_impl(impl: str, triton_unsupported: Callable[[], str | None]) -> str:
    """Resolve ``impl`` to ``"xla"`` or ``"triton"``.

    ``triton_unsupported()`` says why the Triton kernel cannot take these inputs (or None).
    ``"auto"`` falls back to XLA wherever ``"triton"`` would raise.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "xla" or (impl == "auto" and jax.default_backend() != "gpu"):
        return "xla"
    try:
        _triton_modules()
    except ImportError:
        if impl == "triton":
            raise
        return "xla"
    reason = triton_unsupported()
    if reason is None:
        return "triton"
    if impl == "triton":
        raise ValueError(f"impl='triton' cannot run this call: {reason}")
    return "xla"


# ----------------------------------------------------------------------------- encode


def _encode_fwd_xla(
    x: Array, W_enc: Array, b_enc: Array, latent_mask: Array | None, k: int, chunk_rows: int | None
) -> tuple[Array, Array]:
    B, n = x.shape[0], W_enc.shape[0]
    bias = b_enc.astype(jnp.float32)
    if latent_mask is not None:
        bias = jnp.where(latent_mask, bias, -jnp.inf)

    def chunk_fn(carry: None, rows: tuple[Array, ...]) -> tuple[None, tuple[Array, Array]]:
        (xc,) = rows
        pre = lax.dot_general(
            xc, W_enc, (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST,  # no TF32 on GPU: selection must match fp32
            preferred_element_type=jnp.float32,
        ) + bias
        pre = jnp.where(pre == 0, 0.0, pre)  # -0.0 -> +0.0: top_k orders -0.0 below +0.0
        return carry, lax.top_k(pre, k)

    chunk = _rows_per_chunk(B, n, PREACT_ELEMENTS, chunk_rows)
    _, (top, idx) = _scan_rows(chunk_fn, None, (x,), chunk)
    return _finish_topk(top, idx, x.dtype)


def _finish_topk(top: Array, idx: Array, dtype: jnp.dtype) -> tuple[Array, Array]:
    """Sorted fp32 top-k candidates -> (ReLU'd values in ``dtype``, int32 indices, -1 if empty)."""
    empty = top == -jnp.inf
    values = jnp.where(empty, 0.0, jnp.maximum(top, 0.0)).astype(dtype)
    return values, jnp.where(empty, EMPTY, idx).astype(jnp.int32)


def _encode_bwd_xla(
    x: Array, W_enc: Array, values: Array, indices: Array, g_values: Array, chunk_rows: int | None
) -> tuple[Array, Array, Array]:
    """Sparse encoder backward -> (dx [B, d], dW_enc [n, d], db_enc [n]), all fp32."""
    g_pre = jnp.where(values > 0, g_values.astype(jnp.float32), 0.0)  # ReLU gate
    return _encode_bwd_from_pre_grad(x, W_enc, indices, g_pre, chunk_rows)


def _encode_bwd_from_pre_grad(
    x: Array, W_enc: Array, indices: Array, g_pre: Array, chunk_rows: int | None
) -> tuple[Array, Array, Array]:
    """(dx [B, d], dW_enc [n, d], db_enc [n]) fp32 from the selected pre-activations' gradient."""
    B, d = x.shape
    n, k = W_enc.shape[0], indices.shape[1]

    def chunk_fn(
        carry: tuple[Array, Array], rows: tuple[Array, ...]
    ) -> tuple[tuple[Array, Array], tuple[Array]]:
        dW, db = carry
        xc, gc, ic = rows
        w, valid = _gather_rows(W_enc, ic)
        gc = jnp.where(valid, gc, 0.0)
        dx = jnp.sum(gc[:, :, None] * w, axis=1)
        dW = _scatter_rows(dW, ic, gc[:, :, None] * xc.astype(jnp.float32)[:, None, :])
        db = _scatter_rows(db, ic, gc)
        return (dW, db), (dx,)

    init = (jnp.zeros((n, d), jnp.float32), jnp.zeros((n,), jnp.float32))
    (dW, db), (dx,) = _scan_rows(
        chunk_fn, init, (x, g_pre, indices), _rows_per_chunk(B, k * d, GATHER_ELEMENTS, chunk_rows)
    )
    return dx, dW, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _topk_encode(
    x: Array,
    W_enc: Array,
    b_enc: Array,
    latent_mask: Array | None,
    k: int,
    impl: str,
    chunk_rows: int | None,
) -> tuple[Array, Array]:
    if impl == "triton":
        return _encode_fwd_triton(x, W_enc, b_enc, latent_mask, k)
    return _encode_fwd_xla(x, W_enc, b_enc, latent_mask, k, chunk_rows)


def _topk_encode_fwd(
    x: Array,
    W_enc: Array,
    b_enc: Array,
    latent_mask: Array | None,
    k: int,
    impl: str,
    chunk_rows: int | None,
) -> tuple[tuple[Array, Array], tuple[Array, ...]]:
    values, indices = _topk_encode(x, W_enc, b_enc, latent_mask, k, impl, chunk_rows)
    return (values, indices), (x, W_enc, b_enc, values, indices)


def _topk_encode_bwd(
    k: int, impl: str, chunk_rows: int | None, res: tuple[Array, ...], g: tuple[Array, Array]
) -> tuple[Array, Array, Array, None]:
    x, W_enc, b_enc, values, indices = res
    dx, dW, db = _encode_bwd_xla(x, W_enc, values, indices, g[0], chunk_rows)
    return dx.astype(x.dtype), dW.astype(W_enc.dtype), db.astype(b_enc.dtype), None


_topk_encode.defvjp(_topk_encode_fwd, _topk_encode_bwd)


@functools.partial(jax.jit, static_argnames=("k", "impl", "chunk_rows"))
def topk_encode(
    x: Array,
    W_enc: Array,
    b_enc: Array,
    k: int,
    *,
    latent_mask: Array | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> tuple[Array, Array]:
    """Top-k sparse encoding of ``x``; differentiable in ``x``, ``W_enc`` and ``b_enc``.

    Args:
      x: ``[B, d]`` activations.
      W_enc: ``[n, d]`` encoder, one row per latent.
      b_enc: ``[n]`` encoder bias.
      k: latents kept per row, ``1 <= k <= n`` (static).
      latent_mask: optional ``[n]`` bool; latents where it is False are never selected.
      impl: ``"auto"``, ``"xla"`` or ``"triton"`` (see the module docstring).
      chunk_rows: rows per chunk on the XLA path (forward and backward); by default chunks
        hold about ``PREACT_ELEMENTS`` pre-activations and ``GATHER_ELEMENTS`` gathered values.

    Returns:
      ``values[B, k]`` in ``x.dtype``, ReLU'd and sorted descending per row, and
      ``indices[B, k]`` int32, with -1 (and value 0) in slots beyond the eligible latents.

    Gradients are sparse and come back in each primal's dtype: with ``g_pre = g_values *
    (values > 0)``, ``dx[b] = sum_j g_pre[b, j] W_enc[indices[b, j]]``, ``dW_enc`` and
    ``db_enc`` are segment sums over latents of ``g_pre[b, j] x[b]`` and ``g_pre[b, j]``.
    """
    if x.ndim != 2 or W_enc.ndim != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"need x [B, d] and W_enc [n, d]; got {x.shape} and {W_enc.shape}")
    n = W_enc.shape[0]
    if b_enc.shape != (n,):
        raise ValueError(f"b_enc must have shape ({n},), got {b_enc.shape}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if latent_mask is not None:
        if latent_mask.shape != (n,):
            raise ValueError(f"latent_mask must have shape ({n},), got {latent_mask.shape}")
        latent_mask = latent_mask.astype(bool)
    return _topk_encode(
        x, W_enc, b_enc, latent_mask, k,
        _choose_impl(impl, lambda: _encode_triton_unsupported(x.dtype, W_enc.dtype, k)), chunk_rows,
    )


# ----------------------------------------------------------------------------- decode


def _decode_fwd_xla(values: Array, indices: Array, W_dec: Array, chunk_rows: int | None) -> Array:
    B, k = indices.shape
    out_dtype = jnp.result_type(values.dtype, W_dec.dtype)

    def chunk_fn(carry: None, rows: tuple[Array, ...]) -> tuple[None, tuple[Array]]:
        vc, ic = rows
        w, valid = _gather_rows(W_dec, ic)
        coeff = jnp.where(valid, vc.astype(jnp.float32), 0.0)
        # Multiply-reduce rather than a batched dot: XLA fuses the gather into the reduction.
        return carry, (jnp.sum(coeff[:, :, None] * w, axis=1).astype(out_dtype),)

    chunk = _rows_per_chunk(B, k * W_dec.shape[1], GATHER_ELEMENTS, chunk_rows)
    _, (out,) = _scan_rows(chunk_fn, None, (values, indices), chunk)
    return out


def _decode_bwd_xla(
    values: Array, indices: Array, W_dec: Array, g_out: Array, chunk_rows: int | None
) -> tuple[Array, Array]:
    """Sparse decoder backward -> (dvalues [B, k], dW_dec [n, d]), both fp32."""
    B, k = indices.shape
    n, d = W_dec.shape

    def chunk_fn(carry: Array, rows: tuple[Array, ...]) -> tuple[Array, tuple[Array]]:
        vc, ic, gc = rows
        w, valid = _gather_rows(W_dec, ic)
        gc = gc.astype(jnp.float32)
        dv = jnp.where(valid, jnp.sum(gc[:, None, :] * w, axis=2), 0.0)
        coeff = jnp.where(valid, vc.astype(jnp.float32), 0.0)
        carry = _scatter_rows(carry, ic, coeff[:, :, None] * gc[:, None, :])
        return carry, (dv,)

    dW, (dv,) = _scan_rows(
        chunk_fn,
        jnp.zeros((n, d), jnp.float32),
        (values, indices, g_out),
        _rows_per_chunk(B, k * d, GATHER_ELEMENTS, chunk_rows),
    )
    return dv, dW


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sparse_decode(
    values: Array, indices: Array, W_dec: Array, impl: str, chunk_rows: int | None
) -> Array:
    if impl == "triton":
        return _decode_fwd_triton(values, indices, W_dec)
    return _decode_fwd_xla(values, indices, W_dec, chunk_rows)


def _sparse_decode_fwd(
    values: Array, indices: Array, W_dec: Array, impl: str, chunk_rows: int | None
) -> tuple[Array, tuple[Array, Array, Array]]:
    return _sparse_decode(values, indices, W_dec, impl, chunk_rows), (values, indices, W_dec)


def _sparse_decode_bwd(
    impl: str, chunk_rows: int | None, res: tuple[Array, Array, Array], g_out: Array
) -> tuple[Array, None, Array]:
    values, indices, W_dec = res
    dv, dW = _decode_bwd_xla(values, indices, W_dec, g_out, chunk_rows)
    return dv.astype(values.dtype), None, dW.astype(W_dec.dtype)


_sparse_decode.defvjp(_sparse_decode_fwd, _sparse_decode_bwd)


@functools.partial(jax.jit, static_argnames=("impl", "chunk_rows"))
def sparse_decode(
    values: Array,
    indices: Array,
    W_dec: Array,
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> Array:
    """Decode a sparse code: ``out[b] = sum_j values[b, j] * W_dec[indices[b, j]]``.

    Args:
      values: ``[B, k]`` coefficients.
      indices: ``[B, k]`` integer latent ids in ``[0, n)``, or -1 for an empty slot (skipped).
      W_dec: ``[n, d]`` decoder, one row per latent.
      impl: ``"auto"``, ``"xla"`` or ``"triton"`` (see the module docstring).
      chunk_rows: rows per chunk on the XLA path (forward and backward); by default each
        ``[rows, k, d]`` gather holds about ``GATHER_ELEMENTS`` elements.

    Returns:
      ``[B, d]`` in ``result_type(values, W_dec)``, accumulated in fp32.

    Differentiable in ``values`` and ``W_dec`` (gradients in their dtypes):
    ``dvalues[b, j] = g_out[b] . W_dec[indices[b, j]]`` and ``dW_dec`` is the segment sum over
    latents of ``values[b, j] g_out[b]``; empty slots get and give no gradient.
    """
    if values.ndim != 2 or values.shape != indices.shape:
        raise ValueError(f"need values and indices [B, k]; got {values.shape} and {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec must be [n, d], got {W_dec.shape}")
    return _sparse_decode(
        values, indices.astype(jnp.int32), W_dec, _choose_impl(impl, lambda: None), chunk_rows
    )


# ----------------------------------------------------------------------------- prefix decode
# Matryoshka partial reconstructions and JumpReLU threshold encoding: the XLA path only
# (impl="auto" and "xla"); the GPU runs them through XLA as well.


def _xla_only(impl: str, name: str) -> None:
    if impl not in ("auto", "xla"):
        raise ValueError(f"{name} runs on the XLA path only: impl must be 'auto' or 'xla', got {impl!r}")


def _prefix_groups(indices: Array, boundaries: tuple[int, ...]) -> Array:
    """Group of each slot's latent: g with m_{g-1} <= index < m_g (empty slots: group 0)."""
    return jnp.searchsorted(jnp.asarray(boundaries, indices.dtype), jnp.maximum(indices, 0), side="right")


def _prefix_fwd_xla(
    values: Array, indices: Array, W_dec: Array, boundaries: tuple[int, ...], chunk_rows: int | None
) -> Array:
    B, k = indices.shape
    G, d = len(boundaries), W_dec.shape[1]
    out_dtype = jnp.result_type(values.dtype, W_dec.dtype)

    def chunk_fn(carry: None, rows: tuple[Array, ...]) -> tuple[None, tuple[Array]]:
        vc, ic = rows
        w, valid = _gather_rows(W_dec, ic)
        coeff = jnp.where(valid, vc.astype(jnp.float32), 0.0)
        onehot = _prefix_groups(ic, boundaries)[:, :, None] == jnp.arange(G)
        parts = jnp.einsum("rk,rkg,rkd->rgd", coeff, onehot.astype(jnp.float32), w,
                           precision=lax.Precision.HIGHEST)
        return carry, (jnp.cumsum(parts, axis=1).astype(out_dtype),)  # running sums over groups

    chunk = _rows_per_chunk(B, k * d, GATHER_ELEMENTS, chunk_rows)
    _, (out,) = _scan_rows(chunk_fn, None, (values, indices), chunk)
    return jnp.swapaxes(out, 0, 1)


def _prefix_bwd_xla(
    values: Array, indices: Array, W_dec: Array, g_out: Array, boundaries: tuple[int, ...],
    chunk_rows: int | None,
) -> tuple[Array, Array]:
    """Sparse prefix-decode backward -> (dvalues [B, k], dW_dec [n, d]), both fp32."""
    B, k = indices.shape
    n, d = W_dec.shape
    # Suffix sums over groups: the cotangent of a latent of group g, per row: [B, G, d].
    suffix = jnp.swapaxes(jnp.flip(jnp.cumsum(jnp.flip(g_out.astype(jnp.float32), 0), axis=0), 0), 0, 1)

    def chunk_fn(carry: Array, rows: tuple[Array, ...]) -> tuple[Array, tuple[Array]]:
        vc, ic, sc = rows
        w, valid = _gather_rows(W_dec, ic)
        s_slot = jnp.take_along_axis(sc, _prefix_groups(ic, boundaries)[:, :, None], axis=1)  # [rows, k, d]
        dv = jnp.where(valid, jnp.sum(s_slot * w, axis=2), 0.0)
        coeff = jnp.where(valid, vc.astype(jnp.float32), 0.0)
        return _scatter_rows(carry, ic, coeff[:, :, None] * s_slot), (dv,)

    dW, (dv,) = _scan_rows(chunk_fn, jnp.zeros((n, d), jnp.float32), (values, indices, suffix),
                           _rows_per_chunk(B, k * d, GATHER_ELEMENTS, chunk_rows))
    return dv, dW


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _prefix_decode(
    values: Array, indices: Array, W_dec: Array, boundaries: tuple[int, ...], chunk_rows: int | None
) -> Array:
    return _prefix_fwd_xla(values, indices, W_dec, boundaries, chunk_rows)


def _prefix_decode_fwd(values, indices, W_dec, boundaries, chunk_rows):
    return _prefix_decode(values, indices, W_dec, boundaries, chunk_rows), (values, indices, W_dec)


def _prefix_decode_bwd(boundaries, chunk_rows, res, g_out):
    values, indices, W_dec = res
    dv, dW = _prefix_bwd_xla(values, indices, W_dec, g_out, boundaries, chunk_rows)
    return dv.astype(values.dtype), None, dW.astype(W_dec.dtype)


_prefix_decode.defvjp(_prefix_decode_fwd, _prefix_decode_bwd)


@functools.partial(jax.jit, static_argnames=("boundaries", "impl", "chunk_rows"))
def prefix_decode(
    values: Array,
    indices: Array,
    W_dec: Array,
    boundaries: Sequence[int],
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> Array:
    """Matryoshka partial reconstructions: ``out[g, b] = sum_{j: 0 <= indices[b, j] < m_g}
    values[b, j] * W_dec[indices[b, j]]``.

    Args:
      values: ``[B, k]`` coefficients; indices: ``[B, k]`` integer in ``[-1, n)`` (-1 empty).
      W_dec: ``[n, d]`` decoder, one row per latent.
      boundaries: the prefix sizes ``m_1 < ... < m_G = n`` (static; a tuple of ints).
      impl: ``"auto"`` or ``"xla"``.
      chunk_rows: rows per chunk (forward and backward); by default each ``[rows, k, d]``
        gather holds about ``GATHER_ELEMENTS`` elements.

    Returns:
      ``[G, B, d]`` in ``result_type(values, W_dec)``, accumulated in fp32 (group sums, then a
      running sum over groups). ``out[G - 1]`` equals ``sparse_decode`` within rounding, and
      with one boundary the result is ``sparse_decode(...)[None]`` exactly.

    Differentiable in ``values`` and ``W_dec``: with ``S[g] = sum_{g' >= g} g_out[g']`` and g
    the group of a slot's latent, ``dvalues[b, j] = S[g, b] . W_dec[indices[b, j]]`` and
    ``dW_dec`` is the segment sum over latents of ``values[b, j] S[g, b]``.
    """
    _xla_only(impl, "prefix_decode")
    if values.ndim != 2 or values.shape != indices.shape:
        raise ValueError(f"need values and indices [B, k]; got {values.shape} and {indices.shape}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if W_dec.ndim != 2:
        raise ValueError(f"W_dec must be [n, d], got {W_dec.shape}")
    sizes = tuple(int(m) for m in boundaries)
    n = W_dec.shape[0]
    if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] != n:
        raise ValueError(f"boundaries must be strictly increasing prefix sizes ending at n={n}, got {sizes}")
    if len(sizes) == 1:  # one prefix is the whole code: exactly sparse_decode, gradients too
        return _sparse_decode(values, indices.astype(jnp.int32), W_dec, "xla", chunk_rows)[None]
    return _prefix_decode(values, indices.astype(jnp.int32), W_dec, sizes, chunk_rows)


# ----------------------------------------------------------------------------- threshold encode


class ThresholdCode(NamedTuple):
    """What ``threshold_encode`` returns (a pytree); lists in ascending latent index order.

    values [B, cap] (x's dtype), indices [B, cap] int32, counts [B] int32 (exact),
    overflow [B] bool (counts > cap), band_pre [B, band_cap] fp32, band_indices [B, band_cap]
    int32, band_counts [B] int32 (exact), band_overflow [B] bool. Unused slots: 0 and -1.
    """

    values: Array
    indices: Array
    counts: Array
    overflow: Array
    band_pre: Array
    band_indices: Array
    band_counts: Array
    band_overflow: Array


def _first_per_row(pre: Array, mask: Array, cap: int) -> tuple[Array, Array, Array]:
    """The first ``cap`` masked entries of each row of ``pre[R, n]`` by column ->
    (values [R, cap] fp32, columns [R, cap] int32, counts [R] int32); unused slots 0 / -1."""
    R, n = pre.shape
    counts = jnp.sum(mask, axis=1, dtype=jnp.int32)
    if cap == 0:
        return jnp.zeros((R, 0), jnp.float32), jnp.zeros((R, 0), jnp.int32), counts
    # The largest scores are the masked columns with the smallest index.
    score = jnp.where(mask, n - jnp.arange(n, dtype=jnp.int32), 0)
    top, _ = lax.top_k(score, min(cap, n))
    cols = jnp.where(top > 0, n - top, EMPTY)
    vals = jnp.where(top > 0, jnp.take_along_axis(pre, jnp.maximum(cols, 0), axis=1), 0.0)
    if cap > n:
        cols = jnp.pad(cols, ((0, 0), (0, cap - n)), constant_values=EMPTY)
        vals = jnp.pad(vals, ((0, 0), (0, cap - n)))
    return vals, cols, counts


def _threshold_fwd_xla(
    x: Array, W_enc: Array, b_enc: Array, threshold: Array, cap: int, band: float | None, band_cap: int,
    chunk_rows: int | None,
) -> tuple[Array, ...]:
    B, n = x.shape[0], W_enc.shape[0]
    bias = b_enc.astype(jnp.float32)
    thr = threshold.astype(jnp.float32)

    def chunk_fn(carry: None, rows: tuple[Array, ...]) -> tuple[None, tuple[Array, ...]]:
        (xc,) = rows
        pre = lax.dot_general(
            xc, W_enc, (((1,), (1,)), ((), ())),
            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32,
        ) + bias
        out = _first_per_row(pre, pre > thr, cap)
        if band is None:
            near = (jnp.zeros((xc.shape[0], 0), jnp.float32), jnp.zeros((xc.shape[0], 0), jnp.int32),
                    jnp.zeros((xc.shape[0],), jnp.int32))
        else:
            near = _first_per_row(pre, jnp.abs(pre - thr) < band / 2, band_cap)
        return carry, (*out, *near)

    chunk = _rows_per_chunk(B, n, PREACT_ELEMENTS, chunk_rows)
    _, (values, indices, counts, band_pre, band_idx, band_counts) = _scan_rows(chunk_fn, None, (x,), chunk)
    return values.astype(x.dtype), indices, counts, band_pre, band_idx, band_counts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _threshold_encode(x, W_enc, b_enc, threshold, cap, band, band_cap, chunk_rows):
    return _threshold_fwd_xla(x, W_enc, b_enc, threshold, cap, band, band_cap, chunk_rows)


def _threshold_encode_fwd(x, W_enc, b_enc, threshold, cap, band, band_cap, chunk_rows):
    out = _threshold_encode(x, W_enc, b_enc, threshold, cap, band, band_cap, chunk_rows)
    return out, (x, W_enc, b_enc, threshold, out[1])


def _threshold_encode_bwd(cap, band, band_cap, chunk_rows, res, g):
    x, W_enc, b_enc, threshold, indices = res
    # Straight through where active (value = pre there); the threshold's gradient is the caller's.
    g_pre = jnp.where(indices >= 0, g[0].astype(jnp.float32), 0.0)
    dx, dW, db = _encode_bwd_from_pre_grad(x, W_enc, indices, g_pre, chunk_rows)
    return dx.astype(x.dtype), dW.astype(W_enc.dtype), db.astype(b_enc.dtype), jnp.zeros_like(threshold)


_threshold_encode.defvjp(_threshold_encode_fwd, _threshold_encode_bwd)


@functools.partial(jax.jit, static_argnames=("cap", "band", "band_cap", "impl", "chunk_rows"))
def threshold_encode(
    x: Array,
    W_enc: Array,
    b_enc: Array,
    threshold: Array,
    cap: int,
    *,
    band: float | None = None,
    band_cap: int | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> ThresholdCode:
    """JumpReLU sparse code: per row, the latents with ``pre > threshold`` (equality inactive),
    ``pre = x @ W_enc.T + b_enc`` in fp32, in ascending index order up to ``cap``.

    Args:
      x: ``[B, d]``; W_enc: ``[n, d]``; b_enc, threshold: ``[n]``.
      cap: slots per row (static); on overflow the ``cap`` lowest indices are kept.
      band: if given (static), also the latents with ``|pre - threshold| < band / 2``, up to
        ``band_cap`` (default cap) per row: the rectangle kernel's support for the threshold's
        pseudo-gradient (formula in ``sae_kernels.threshold_encode``).
      impl: ``"auto"`` or ``"xla"``; chunk_rows: rows per chunk (default: ``PREACT_ELEMENTS``
        pre-activations per chunk).

    Returns:
      A :class:`ThresholdCode`; ``[B, n]`` is never built for the whole batch.

    Gradients: ``values`` is differentiable in x, W_enc, b_enc (straight through where
    active, sparse); the threshold gets a zero cotangent here and the other outputs none.
    """
    _xla_only(impl, "threshold_encode")
    if x.ndim != 2 or W_enc.ndim != 2 or W_enc.shape[1] != x.shape[1]:
        raise ValueError(f"need x [B, d] and W_enc [n, d]; got {x.shape} and {W_enc.shape}")
    n = W_enc.shape[0]
    for name, a in (("b_enc", b_enc), ("threshold", threshold)):
        if a.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {a.shape}")
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    if band is not None and not band > 0:
        raise ValueError(f"band must be > 0, got {band!r}")
    width = 0 if band is None else (cap if band_cap is None else band_cap)
    if band is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"band_cap must be an integer >= 1, got {band_cap!r}")
    values, indices, counts, band_pre, band_idx, band_counts = _threshold_encode(
        x, W_enc, b_enc, threshold, cap, None if band is None else float(band), width, chunk_rows)
    return ThresholdCode(values, indices, counts, counts > cap, band_pre, band_idx, band_counts,
                         band_counts > width)


# ----------------------------------------------------------------------------- Triton (GPU)
# Forward passes only: both impls share the sparse XLA backward passes above.


def _triton_modules() -> tuple[ModuleType, ModuleType]:
    """Import ``jax_triton`` and ``sae_kernels.triton_kernels`` (GPU stack, torch) on first use."""
    try:
        import jax_triton
    except ImportError as err:
        raise ImportError(
            "impl='triton' needs the jax-triton package and a CUDA build of JAX; "
            "use impl='xla' otherwise"
        ) from err
    from . import triton_kernels

    return jax_triton, triton_kernels


def _encode_triton_unsupported(x_dtype: jnp.dtype, w_dtype: jnp.dtype, k: int) -> str | None:
    """Why the fused Triton encoder cannot take these inputs, or None if it can."""
    if x_dtype != w_dtype:
        return f"x and W_enc must share a dtype, got {x_dtype} and {w_dtype}"
    if x_dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype must be fp32, bf16 or fp16, got {x_dtype}"
    _, tk = _triton_modules()
    if _next_pow2(k) > tk.MAX_K_PAD:
        return f"the fused kernel keeps at most {tk.MAX_K_PAD} latents per row, got k={k}"
    return None


def _next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _merge_candidates(halves: Array, k: int) -> tuple[Array, Array]:
    """Merge the encoder kernel's per-split candidates into the final top-k.

    Args:
      halves: ``[splits, B, k_pad, 2]`` int32, the kernel's int64 packed keys as (low, high)
        words. High word: the fp32 value's bits mapped to an int32 that orders like the float;
        low word: ``~latent``, so that equal values rank the smaller latent first.
      k: latents to keep.

    Returns:
      fp32 top values ``[B, k]`` sorted descending and int32 latent ids ``[B, k]``.
    """
    splits, B, k_pad, _ = halves.shape
    halves = jnp.moveaxis(halves, 0, 1).reshape(B, splits * k_pad, 2)
    # Ascending sort on (~high, latent) is descending value, then ascending latent.
    neg_key, latent = lax.sort((~halves[..., 1], ~halves[..., 0]), dimension=1, num_keys=2)
    ordered = ~neg_key[:, :k]
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return lax.bitcast_convert_type(bits, jnp.float32), latent[:, :k]


def _encode_fwd_triton(
    x: Array, W_enc: Array, b_enc: Array, latent_mask: Array | None, k: int
) -> tuple[Array, Array]:
    jt, tk = _triton_modules()
    import torch  # the launch plan is keyed on torch dtypes

    B, d = x.shape
    n = W_enc.shape[0]
    # The same tiles, grid and splits the torch launcher uses (the compile test checks them).
    plan = tk.encode_plan(B, n, k, getattr(torch, jnp.dtype(x.dtype).name), jax.devices("gpu")[0].core_count)
    bias = b_enc.astype(jnp.float32)
    if latent_mask is not None:
        bias = jnp.where(latent_mask, bias, -jnp.inf)
    # The kernel writes int64 keys, which JAX only types with x64 on; the int32 view leaves it.
    with jax.enable_x64(True):
        cand = jt.triton_call(
            x, W_enc, bias,
            kernel=tk._encode_topk_kernel.compiled,
            out_type=jax.ShapeDtypeStruct((plan.splits, B, plan.k_pad), jnp.int64),
            grid=plan.grid,
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
            B=B, n=n, d=d, k=k, tiles_per_split=plan.tiles_per_split,
            **plan.constexprs,
        )
        halves = lax.bitcast_convert_type(cand, jnp.int32)
    top, idx = _merge_candidates(halves, k)
    return _finish_topk(top, idx, x.dtype)


def _decode_fwd_triton(values: Array, indices: Array, W_dec: Array) -> Array:
    jt, tk = _triton_modules()
    B, k = indices.shape
    d = W_dec.shape[1]
    out_type = jax.ShapeDtypeStruct((B, d), jnp.result_type(values.dtype, W_dec.dtype))
    if B == 0 or k == 0:
        return jnp.zeros(out_type.shape, out_type.dtype)
    return jt.triton_call(
        values, indices, W_dec,
        kernel=tk._decode_kernel.compiled,
        out_type=out_type,
        grid=(B, _cdiv(d, tk._DECODE_BLOCK_D)),
        num_warps=tk._DECODE_WARPS,
        k=k, d=d,
        BLOCK_J=min(tk._DECODE_BLOCK_J, _next_pow2(k)), BLOCK_D=tk._DECODE_BLOCK_D,
    )
