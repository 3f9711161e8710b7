"""The public PyTorch API: dispatch between implementations, custom ops and autograd.

``topk_encode`` and ``sparse_decode`` are registered as ``torch.library`` custom ops with fake
(meta) implementations, so ``torch.compile`` traces through them, and with autograd formulas
built from the sparse primitives below:

* encoder: ``g_pre = g_values * (values > 0)``; ``dx = sparse_decode(g_pre, indices, W_enc)``;
  ``dW_enc``, ``db_enc`` = sparse-transpose product of ``g_pre`` with ``x`` (selected rows only).
* decoder: ``dvalues = gather_dot(g_out, indices, W_dec)``; ``dW_dec`` = sparse-transpose
  product of ``values`` with ``g_out``.

Implementations (``impl``): ``"triton"`` runs the Triton kernels (compiled on CUDA tensors,
under the interpreter on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported); ``"chunked"`` the chunked PyTorch path; ``"torch"`` the plain reference;
``"auto"`` picks Triton on CUDA and the chunked path elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import chunked, reference
from .reference import EMPTY
from .validate import check_code, check_encode_inputs

Impl = Literal["auto", "triton", "chunked", "torch"]
IMPLS = ("auto", "triton", "chunked", "torch")


def _resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" else "chunked"
    return impl


def _plain_call(*tensors: torch.Tensor) -> bool:
    """Whether a call can skip the custom-op dispatcher: no gradient wanted, no tracing.

    The dispatcher imports torch._dynamo on its first call (about 150 MiB resident and a
    second), which inference and the hand-written training backward do not need.
    """
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(type(t) is torch.Tensor for t in tensors)  # fake and functional tensors trace


def _triton():
    """The Triton launchers, imported on first use (importing triton costs about a second)."""
    from . import triton_kernels

    return triton_kernels


# ---------------------------------------------------------------------------------------------
# Primitives, one dispatch each.
# ---------------------------------------------------------------------------------------------


def _encode(x, W_enc, b_enc, k, latent_mask, impl):
    if impl == "torch":
        return reference.topk_encode_ref(x, W_enc, b_enc, k, latent_mask)
    if impl == "triton":
        tk = _triton()
        bias = b_enc.float()
        if latent_mask is not None:
            bias = bias.masked_fill(~latent_mask, float("-inf"))
        if k <= tk.MAX_FUSED_K:
            pre, idx = tk.encode_topk(x, W_enc, bias, k)
            empty = torch.isneginf(pre)
            values = pre.clamp_min(0).masked_fill(empty, 0).to(x.dtype)
            return values, idx.masked_fill(empty, EMPTY)
        # A running top-k this large does not fit in registers; the chunked path is exact.
    return chunked.topk_encode(x, W_enc, b_enc, k, latent_mask)


def _decode(values, indices, W, impl):
    if impl == "torch":
        return reference.sparse_decode_ref(values, indices, W)
    if impl == "triton":
        return _triton().decode(values, indices, W)
    return chunked.sparse_decode(values, indices, W)


def _gather_dot(g, indices, W, impl):
    if impl == "triton":
        return _triton().gather_dot(g, indices, W)
    if impl == "torch":
        dots = torch.einsum("bd,bkd->bk", g.float(), W.float()[indices.clamp_min(0)])
        return dots * (indices >= 0)
    return chunked.gather_dot(g, indices, W)


def _segment_rows(coeff, indices, src, impl):
    if impl == "triton":
        return _triton().segment_rows(coeff, indices, src)
    if impl == "torch":
        valid = (indices >= 0).reshape(-1)
        flat = indices.reshape(-1)[valid]
        rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
        weights = coeff.reshape(-1).float()[valid]
        tokens = torch.arange(indices.shape[0], device=src.device).repeat_interleave(indices.shape[1])[valid]
        contrib = weights[:, None] * src.float()[tokens]
        grads = torch.zeros(rows.numel(), src.shape[1], device=src.device).index_add_(0, inverse, contrib)
        sums = torch.zeros(rows.numel(), device=src.device).index_add_(0, inverse, weights)
        return rows, grads, sums
    return chunked.segment_rows(coeff, indices, src)


def _densify(rows: torch.Tensor, grads: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter row-sparse gradients into a zero [n, ...] tensor (rows are unique: no races)."""
    dense = grads.new_zeros((n,) + tuple(grads.shape[1:]))
    return dense.index_copy_(0, rows, grads)


# ---------------------------------------------------------------------------------------------
# Row-sparse gradients: what an optimizer that updates only touched rows consumes.
# ---------------------------------------------------------------------------------------------


@dataclass
class RowSparseGrad:
    """Gradient of an ``[n, d]`` weight that is zero outside ``rows``.

    rows: [U] int64, ascending and unique; grad: [U, d] fp32; bias_grad: [U] fp32 (the
    gradient of the matching bias entries) or None.
    """

    rows: torch.Tensor
    grad: torch.Tensor
    bias_grad: torch.Tensor | None = None

    def to_dense(self, n: int) -> torch.Tensor:
        """The same gradient as a dense [n, d] fp32 tensor."""
        return _densify(self.rows, self.grad, n)


@dataclass
class EncodeGrads:
    """Gradients of ``topk_encode``: dx [B, d] (x's dtype); W_enc and b_enc row-sparse."""

    dx: torch.Tensor
    W_enc: RowSparseGrad


@dataclass
class DecodeGrads:
    """Gradients of ``sparse_decode``: dvalues [B, k] (values' dtype); W_dec row-sparse."""

    dvalues: torch.Tensor
    W_dec: RowSparseGrad


def topk_encode_backward(
    grad_values: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> EncodeGrads:
    """Backward of ``topk_encode`` in row-sparse form. grad_values, values, indices: [B, k]."""
    impl = _resolve(impl, x.device)
    g_pre = grad_values.float() * (values > 0)
    dx = _decode(g_pre, indices, W_enc, impl).to(x.dtype)
    rows, grads, sums = _segment_rows(g_pre, indices, x, impl)
    return EncodeGrads(dx, RowSparseGrad(rows, grads, sums))


def sparse_decode_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> DecodeGrads:
    """Backward of ``sparse_decode`` in row-sparse form. grad_out: [B, d]; values, indices: [B, k]."""
    impl = _resolve(impl, grad_out.device)
    dvalues = _gather_dot(grad_out, indices, W_dec, impl).to(values.dtype)
    rows, grads, _ = _segment_rows(values, indices, grad_out, impl)
    return DecodeGrads(dvalues, RowSparseGrad(rows, grads))


# ---------------------------------------------------------------------------------------------
# Custom ops: fake implementations for tracing, autograd formulas.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("sae_kernels::topk_encode", mutates_args=())
def _topk_encode_op(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, latent_mask: torch.Tensor | None, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return _encode(x, W_enc, b_enc, k, latent_mask, impl)


@_topk_encode_op.register_fake
def _(x, W_enc, b_enc, k, latent_mask, impl):
    B = x.shape[0]
    return x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int64)


@torch.library.custom_op("sae_kernels::sparse_decode", mutates_args=())
def _sparse_decode_op(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, impl: str) -> torch.Tensor:
    return _decode(values, indices, W_dec, impl)


@_sparse_decode_op.register_fake
def _(values, indices, W_dec, impl):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1], dtype=torch.promote_types(values.dtype, W_dec.dtype))


@torch.library.custom_op("sae_kernels::gather_dot", mutates_args=())
def _gather_dot_op(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, impl: str) -> torch.Tensor:
    return _gather_dot(g, indices, W, impl)


@_gather_dot_op.register_fake
def _(g, indices, W, impl):
    return g.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("sae_kernels::segment_rows_dense", mutates_args=())
def _segment_rows_dense_op(
    coeff: torch.Tensor, indices: torch.Tensor, src: torch.Tensor, n: int, impl: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, grads, sums = _segment_rows(coeff, indices, src, impl)
    return _densify(rows, grads, n), _densify(rows, sums, n)


@_segment_rows_dense_op.register_fake
def _(coeff, indices, src, n, impl):
    return src.new_empty(n, src.shape[1], dtype=torch.float32), src.new_empty(n, dtype=torch.float32)


def _encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, k, latent_mask, impl = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, values, indices)
    ctx.impl = impl
    ctx.b_dtype = b_enc.dtype


def _encode_backward(ctx, grad_values, grad_indices):
    x, W_enc, values, indices = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g_pre = grad_values.float() * (values > 0)
    dx = dW = db = None
    if need_x:
        dx = _sparse_decode_op(g_pre, indices, W_enc, ctx.impl).to(x.dtype)
    if need_w or need_b:
        dW_full, db_full = _segment_rows_dense_op(g_pre, indices, x, W_enc.shape[0], ctx.impl)
        dW = dW_full.to(W_enc.dtype) if need_w else None
        db = db_full.to(ctx.b_dtype) if need_b else None
    return dx, dW, db, None, None, None


def _decode_setup(ctx, inputs, output):
    values, indices, W_dec, impl = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.impl = impl


def _decode_backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    need_v, _, need_w = ctx.needs_input_grad[:3]
    dvalues = dW = None
    if need_v:
        dvalues = _gather_dot_op(grad_out, indices, W_dec, ctx.impl).to(values.dtype)
    if need_w:
        dW = _segment_rows_dense_op(values, indices, grad_out, W_dec.shape[0], ctx.impl)[0].to(W_dec.dtype)
    return dvalues, None, dW, None


torch.library.register_autograd("sae_kernels::topk_encode", _encode_backward, setup_context=_encode_setup)
torch.library.register_autograd("sae_kernels::sparse_decode", _decode_backward, setup_context=_decode_setup)


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    latent_mask: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sparse code of ``relu``-ed pre-activations ``x @ W_enc.T + b_enc``.

    Args:
        x: [B, d] activations (fp32, bf16 or fp16).
        W_enc: [n, d] encoder, one row per latent, same dtype as x.
        b_enc: [n] encoder bias.
        k: latents kept per row, 1 <= k <= n.
        latent_mask: optional [n] bool; only latents where it is true may be selected (the
            AuxK dead-latent pass).
        impl: "auto", "triton", "chunked" or "torch" (see the module docstring).

    Returns:
        values [B, k] in x's dtype, sorted descending per row, ReLU applied;
        indices [B, k] int64. Among exactly equal pre-activations the smaller latent index comes
        first on the Triton and torch paths; the chunked path keeps the same values and one of
        the tied latents (deterministically). When fewer
        than k latents are eligible under the mask, the trailing slots hold value 0 and index -1,
        which ``sparse_decode`` and every backward pass skip.

    Differentiable in x, W_enc and b_enc; the backward touches only the selected rows.
    """
    check_encode_inputs(x, W_enc, b_enc, k, latent_mask)
    impl = _resolve(impl, x.device)
    mask = None if latent_mask is None else latent_mask.bool()
    if _plain_call(x, W_enc, b_enc):
        return _encode(x, W_enc, b_enc, int(k), mask, impl)
    return _topk_encode_op(x, W_enc, b_enc, int(k), mask, impl)


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, *, impl: Impl = "auto"
) -> torch.Tensor:
    """``out[b] = sum_j values[b, j] * W_dec[indices[b, j]]``; slots with index -1 are skipped.

    Args:
        values: [B, k] float; indices: [B, k] integer in [-1, n); W_dec: [n, d].
    Returns:
        [B, d] in ``torch.promote_types(values.dtype, W_dec.dtype)``, accumulated in fp32.

    Differentiable in values and W_dec; the backward touches only the selected rows.
    """
    check_code(values, indices, W_dec)
    impl = _resolve(impl, values.device)
    if _plain_call(values, W_dec):
        return _decode(values, indices.long(), W_dec, impl)
    return _sparse_decode_op(values, indices.long(), W_dec, impl)
