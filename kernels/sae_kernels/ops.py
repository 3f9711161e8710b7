"""The public PyTorch API: one dispatch path through ``torch.library`` custom ops.

Every public function validates its arguments, resolves ``impl`` and calls one of four ops,
``torch.ops.sae_kernels.{topk_encode, sparse_decode, gather_dot, segment_rows}``. Each op has a
fake (meta) implementation, so ``torch.compile`` traces through it; ``topk_encode`` and
``sparse_decode`` have autograd formulas. The ops are defined with ``torch.library.Library``
and a plain implementation, so their first call does not import ``torch._dynamo`` (about
150 MiB resident and a second, which ``torch.library.custom_op`` spends on every process).

Backward math, written once below and used by the autograd formulas and by the row-sparse
API (``topk_encode_backward``, ``sparse_decode_backward``) alike, on every implementation:

* encoder: ``g_pre = g_values * (values > 0)``; ``dx = sparse_decode(g_pre, indices, W_enc)``;
  ``dW_enc``, ``db_enc`` = sparse-transpose product of ``g_pre`` with ``x`` (selected rows only).
* decoder: ``dvalues = gather_dot(g_out, indices, W_dec)``; ``dW_dec`` = sparse-transpose
  product of ``values`` with ``g_out``.

Implementations (``impl``), one row each of the table ``PRIMITIVES``: ``"triton"`` runs the
Triton kernels (compiled on CUDA tensors, under Triton's interpreter on CPU tensors);
``"chunked"`` the chunked PyTorch path; ``"reference"`` the plain PyTorch oracle, which builds
``[B, n]``; ``"auto"`` picks Triton on CUDA (the chunked path where k exceeds what the Triton
encoder holds) and the chunked path elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from . import chunked, reference
from .validate import MAX_TRITON_K, check_code, check_encode_inputs

Impl = Literal["auto", "triton", "chunked", "reference"]


# ---------------------------------------------------------------------------------------------
# The four primitives, one implementation each per impl: a table keyed by the impl's name.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Primitives:
    """One implementation of the four primitives the custom ops run.

    encode(x [B, d], W_enc [n, d], b_enc [n], k, latent_mask [n] | None) -> (values, indices) [B, k];
    decode(values [B, k], indices [B, k], W [n, d]) -> [B, d];
    gather_dot(g [B, d], indices [B, k], W [n, d]) -> [B, k] fp32;
    segment_rows(coeff [B, k], indices [B, k], src [B, d]) -> (rows [U], grads [U, d], sums [U]).
    """

    encode: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[..., torch.Tensor]
    gather_dot: Callable[..., torch.Tensor]
    segment_rows: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _triton_launcher(name: str) -> Callable[..., Any]:
    """``triton_kernels.<name>``, imported on its first call (importing triton costs about a second)."""

    def launch(*args: Any) -> Any:
        from . import triton_kernels

        return getattr(triton_kernels, name)(*args)

    return launch


_triton_encode_topk = _triton_launcher("encode_topk")


def _triton_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, latent_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused Triton encoder with the public semantics: mask through the bias, ReLU, empty slots."""
    bias = b_enc.float()
    if latent_mask is not None:
        bias = bias.masked_fill(~latent_mask, float("-inf"))
    pre, idx = _triton_encode_topk(x, W_enc, bias, k)
    empty = torch.isneginf(pre)
    values = pre.clamp_min(0).masked_fill(empty, 0).to(x.dtype)
    return values, idx.masked_fill(empty, reference.EMPTY)


# impl name -> its primitives; "auto" is resolved to one of these before any op runs.
PRIMITIVES: dict[str, Primitives] = {
    "triton": Primitives(_triton_encode, _triton_launcher("decode"), _triton_launcher("gather_dot"),
                         _triton_launcher("segment_rows")),
    "chunked": Primitives(chunked.topk_encode, chunked.sparse_decode, chunked.gather_dot, chunked.segment_rows),
    "reference": Primitives(reference.topk_encode_ref, reference.sparse_decode_ref, reference.gather_dot_ref,
                            reference.segment_rows_ref),
}
IMPLS = ("auto", *PRIMITIVES)


def _resolve(impl: str, device: torch.device, k: int | None = None) -> str:
    """The implementation that runs: ``impl`` itself, or the choice of ``"auto"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    fits_triton = k is None or k <= MAX_TRITON_K
    if impl == "auto":
        return "triton" if device.type == "cuda" and fits_triton else "chunked"
    if impl == "triton" and not fits_triton:
        raise ValueError(
            f"impl='triton' keeps at most k={MAX_TRITON_K} latents per row in registers, got k={k}; "
            "use impl='chunked' (or 'auto', which picks it)"
        )
    return impl


# The ops' implementations: the primitive of the impl named by their last argument.


def _encode(x, W_enc, b_enc, k, latent_mask, impl):
    return PRIMITIVES[impl].encode(x, W_enc, b_enc, k, latent_mask)


def _decode(values, indices, W, impl):
    return PRIMITIVES[impl].decode(values, indices, W)


def _gather_dot(g, indices, W, impl):
    return PRIMITIVES[impl].gather_dot(g, indices, W)


def _segment_rows(coeff, indices, src, impl):
    return PRIMITIVES[impl].segment_rows(coeff, indices, src)


# ---------------------------------------------------------------------------------------------
# Custom ops: schemas, implementations, fake implementations.
# ---------------------------------------------------------------------------------------------

_lib = torch.library.Library("sae_kernels", "DEF")
_lib.define("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? latent_mask, str impl) -> (Tensor, Tensor)")
_lib.define("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, str impl) -> Tensor")
_lib.define("gather_dot(Tensor g, Tensor indices, Tensor W, str impl) -> Tensor")
_lib.define("segment_rows(Tensor coeff, Tensor indices, Tensor src, str impl) -> (Tensor, Tensor, Tensor)")
for _name, _fn in (("topk_encode", _encode), ("sparse_decode", _decode), ("gather_dot", _gather_dot),
                   ("segment_rows", _segment_rows)):
    _lib.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("sae_kernels::topk_encode", lib=_lib)
def _(x, W_enc, b_enc, k, latent_mask, impl):
    B = x.shape[0]
    return x.new_empty(B, k), x.new_empty(B, k, dtype=torch.int64)


@torch.library.register_fake("sae_kernels::sparse_decode", lib=_lib)
def _(values, indices, W_dec, impl):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1], dtype=torch.promote_types(values.dtype, W_dec.dtype))


@torch.library.register_fake("sae_kernels::gather_dot", lib=_lib)
def _(g, indices, W, impl):
    return g.new_empty(indices.shape, dtype=torch.float32)


@torch.library.register_fake("sae_kernels::segment_rows", lib=_lib)
def _(coeff, indices, src, impl):
    U = torch.library.get_ctx().new_dynamic_size()  # how many distinct rows: data-dependent
    return (indices.new_empty(U, dtype=torch.int64), src.new_empty(U, src.shape[1], dtype=torch.float32),
            src.new_empty(U, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------
# Row-sparse gradients and the backward math, once.
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

    def bias_to_dense(self, n: int) -> torch.Tensor:
        """The bias gradient as a dense [n] fp32 tensor."""
        assert self.bias_grad is not None, "this gradient has no bias part"
        return _densify(self.rows, self.bias_grad, n)


def _densify(rows: torch.Tensor, grads: torch.Tensor, n: int) -> torch.Tensor:
    """Scatter row-sparse gradients into a zero [n, ...] tensor (rows are unique: no races)."""
    return grads.new_zeros((n,) + tuple(grads.shape[1:])).index_copy_(0, rows, grads)


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


def _preactivation_grad(grad_values: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[B, k] fp32 gradient of the selected pre-activations (ReLU: zero where the value is 0)."""
    return grad_values.float() * (values > 0)


def _encoder_input_grad(g_pre, indices, W_enc, x_dtype, impl) -> torch.Tensor:
    """dx [B, d] = sum_j g_pre[b, j] * W_enc[indices[b, j]], in x's dtype."""
    return torch.ops.sae_kernels.sparse_decode(g_pre, indices, W_enc, impl).to(x_dtype)


def _encoder_weight_grad(g_pre, indices, x, impl) -> RowSparseGrad:
    """dW_enc and db_enc over the selected rows: g_pre's sparse transpose times x."""
    rows, grads, sums = torch.ops.sae_kernels.segment_rows(g_pre, indices, x, impl)
    return RowSparseGrad(rows, grads, sums)


def _decoder_values_grad(grad_out, indices, W_dec, values_dtype, impl) -> torch.Tensor:
    """dvalues [B, k] = dot(grad_out[b], W_dec[indices[b, j]]), in the values' dtype."""
    return torch.ops.sae_kernels.gather_dot(grad_out, indices, W_dec, impl).to(values_dtype)


def _decoder_weight_grad(values, indices, grad_out, impl) -> RowSparseGrad:
    """dW_dec over the selected rows: the values' sparse transpose times grad_out."""
    rows, grads, _ = torch.ops.sae_kernels.segment_rows(values, indices, grad_out, impl)
    return RowSparseGrad(rows, grads)


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
    g_pre = _preactivation_grad(grad_values, values)
    return EncodeGrads(_encoder_input_grad(g_pre, indices, W_enc, x.dtype, impl),
                       _encoder_weight_grad(g_pre, indices, x, impl))


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
    return DecodeGrads(_decoder_values_grad(grad_out, indices, W_dec, values.dtype, impl),
                       _decoder_weight_grad(values, indices, grad_out, impl))


# ---------------------------------------------------------------------------------------------
# Autograd formulas: the same math, densified for autograd's [n, d] gradients.
# ---------------------------------------------------------------------------------------------


def _encode_setup(ctx, inputs, output):
    x, W_enc, b_enc, k, latent_mask, impl = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, values, indices)
    ctx.impl = impl
    ctx.b_dtype = b_enc.dtype


def _encode_backward(ctx, grad_values, grad_indices):
    x, W_enc, values, indices = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g_pre = _preactivation_grad(grad_values, values)
    dx = dW = db = None
    if need_x:
        dx = _encoder_input_grad(g_pre, indices, W_enc, x.dtype, ctx.impl)
    if need_w or need_b:
        grad = _encoder_weight_grad(g_pre, indices, x, ctx.impl)
        n = W_enc.shape[0]
        dW = grad.to_dense(n).to(W_enc.dtype) if need_w else None
        db = grad.bias_to_dense(n).to(ctx.b_dtype) if need_b else None
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
        dvalues = _decoder_values_grad(grad_out, indices, W_dec, values.dtype, ctx.impl)
    if need_w:
        dW = _decoder_weight_grad(values, indices, grad_out, ctx.impl).to_dense(W_dec.shape[0]).to(W_dec.dtype)
    return dvalues, None, dW, None


torch.library.register_autograd("sae_kernels::topk_encode", _encode_backward, setup_context=_encode_setup, lib=_lib)
torch.library.register_autograd("sae_kernels::sparse_decode", _decode_backward, setup_context=_decode_setup, lib=_lib)


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
        k: latents kept per row, 1 <= k <= n (and k <= 256 for impl="triton").
        latent_mask: optional [n] bool; only latents where it is true may be selected (the
            AuxK dead-latent pass).
        impl: "auto", "triton", "chunked" or "reference" (see the module docstring).

    Returns:
        values [B, k] in x's dtype, sorted descending per row, ReLU applied;
        indices [B, k] int64. Among exactly equal pre-activations the smaller latent index comes
        first on the Triton and reference paths; the chunked path keeps the same values and one
        of the tied latents (deterministically). When fewer
        than k latents are eligible under the mask, the trailing slots hold value 0 and index -1,
        which ``sparse_decode`` and every backward pass skip.

    Differentiable in x, W_enc and b_enc; the backward touches only the selected rows.
    """
    check_encode_inputs(x, W_enc, b_enc, k, latent_mask)
    impl = _resolve(impl, x.device, k)
    return torch.ops.sae_kernels.topk_encode(x, W_enc, b_enc, int(k), latent_mask, impl)


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
    return torch.ops.sae_kernels.sparse_decode(values, indices.long(), W_dec, impl)
