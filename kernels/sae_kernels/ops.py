"""The public PyTorch API: one dispatch path through ``torch.library`` custom ops.

Every public function validates its arguments, resolves ``impl`` and calls one of six ops,
``torch.ops.sae_kernels.{topk_encode, sparse_decode, gather_dot, segment_rows, prefix_decode,
threshold_encode}``. Each op has a fake (meta) implementation, so ``torch.compile`` traces
through it; ``topk_encode``, ``sparse_decode``, ``prefix_decode`` and ``threshold_encode`` have
autograd formulas. The ops are defined with ``torch.library.Library``
and a plain implementation, so their first call does not import ``torch._dynamo`` (about
150 MiB resident and a second, which ``torch.library.custom_op`` spends on every process).

Backward math, written once below and used by the autograd formulas and by the row-sparse
API (``topk_encode_backward``, ``sparse_decode_backward``) alike, on every implementation:

* encoder: ``g_pre = g_values * (values > 0)``; ``dx = sparse_decode(g_pre, indices, W_enc)``;
  ``dW_enc``, ``db_enc`` = sparse-transpose product of ``g_pre`` with ``x`` (selected rows only).
* decoder: ``dvalues = gather_dot(g_out, indices, W_dec)``; ``dW_dec`` = sparse-transpose
  product of ``values`` with ``g_out``.
* prefix decoder (Matryoshka, ``g_out [G, B, d]``): ``S = suffix sums of g_out over groups``
  (a latent of group g is in prefixes g..G-1); the code split by group into ``[G * B, k]``
  rows against ``S`` as ``[G * B, d]``, then the decoder's two primitives.
* threshold encoder (JumpReLU): ``g_pre = g_values * (indices >= 0)`` (straight through where
  active), then the encoder's; no gradient for the threshold (see ``threshold_encode``).

Implementations (``impl``), one row each of the table ``PRIMITIVES``: ``"triton"`` runs the
Triton kernels (compiled on CUDA tensors, under Triton's interpreter on CPU tensors);
``"chunked"`` the chunked PyTorch path; ``"reference"`` the plain PyTorch oracle, which builds
``[B, n]``; ``"auto"`` picks Triton on CUDA (the chunked path where k exceeds what the Triton
encoder holds) and the chunked path elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

import torch

from . import chunked, reference
from .validate import MAX_TRITON_K, check_boundaries, check_code, check_encode_inputs, check_threshold_inputs

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
    segment_rows(coeff [B, k], indices [B, k], src [B, d]) -> (rows [U], grads [U, d], sums [U]);
    prefix_decode(values [B, k], indices [B, k], W [n, d], boundaries [G]) -> [G, B, d];
    threshold_encode(x, W_enc, b_enc, threshold [n], cap, band | None, band_cap) ->
        (values [B, cap], indices [B, cap], counts [B], band_pre [B, band_cap],
        band_indices [B, band_cap], band_counts [B]).
    """

    encode: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[..., torch.Tensor]
    gather_dot: Callable[..., torch.Tensor]
    segment_rows: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    prefix_decode: Callable[..., torch.Tensor]
    threshold_encode: Callable[..., tuple[torch.Tensor, ...]]


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


_triton_threshold = _triton_launcher("threshold_encode")


def _triton_threshold_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, cap: int,
    band: float | None, band_cap: int,
) -> tuple[torch.Tensor, ...]:
    """The fused Triton threshold encoder with the public dtypes (values in x's dtype)."""
    values, *rest = _triton_threshold(x, W_enc, b_enc.float(), threshold.float(), cap, band, band_cap)
    return (values.to(x.dtype), *rest)


# impl name -> its primitives; "auto" is resolved to one of these before any op runs.
PRIMITIVES: dict[str, Primitives] = {
    "triton": Primitives(_triton_encode, _triton_launcher("decode"), _triton_launcher("gather_dot"),
                         _triton_launcher("segment_rows"), _triton_launcher("prefix_decode"),
                         _triton_threshold_encode),
    "chunked": Primitives(chunked.topk_encode, chunked.sparse_decode, chunked.gather_dot, chunked.segment_rows,
                          chunked.prefix_decode, chunked.threshold_encode),
    "reference": Primitives(reference.topk_encode_ref, reference.sparse_decode_ref, reference.gather_dot_ref,
                            reference.segment_rows_ref, reference.prefix_decode_ref,
                            reference.threshold_encode_ref),
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


def _prefix_decode(values, indices, W, boundaries, impl):
    if len(boundaries) == 1:  # one prefix is the whole code: exactly sparse_decode
        return PRIMITIVES[impl].decode(values, indices, W).unsqueeze(0)
    return PRIMITIVES[impl].prefix_decode(values, indices, W, list(boundaries))


def _threshold_encode(x, W_enc, b_enc, threshold, cap, band, band_cap, impl):
    return PRIMITIVES[impl].threshold_encode(x, W_enc, b_enc, threshold, cap, band, band_cap)


# ---------------------------------------------------------------------------------------------
# Custom ops: schemas, implementations, fake implementations.
# ---------------------------------------------------------------------------------------------

_lib = torch.library.Library("sae_kernels", "DEF")
_lib.define("topk_encode(Tensor x, Tensor W_enc, Tensor b_enc, int k, Tensor? latent_mask, str impl) -> (Tensor, Tensor)")
_lib.define("sparse_decode(Tensor values, Tensor indices, Tensor W_dec, str impl) -> Tensor")
_lib.define("gather_dot(Tensor g, Tensor indices, Tensor W, str impl) -> Tensor")
_lib.define("segment_rows(Tensor coeff, Tensor indices, Tensor src, str impl) -> (Tensor, Tensor, Tensor)")
_lib.define("prefix_decode(Tensor values, Tensor indices, Tensor W_dec, int[] boundaries, str impl) -> Tensor")
_lib.define("threshold_encode(Tensor x, Tensor W_enc, Tensor b_enc, Tensor threshold, int cap, float? band, "
            "int band_cap, str impl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
for _name, _fn in (("topk_encode", _encode), ("sparse_decode", _decode), ("gather_dot", _gather_dot),
                   ("segment_rows", _segment_rows), ("prefix_decode", _prefix_decode),
                   ("threshold_encode", _threshold_encode)):
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


@torch.library.register_fake("sae_kernels::prefix_decode", lib=_lib)
def _(values, indices, W_dec, boundaries, impl):
    out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
    return W_dec.new_empty(len(boundaries), values.shape[0], W_dec.shape[1], dtype=out_dtype)


@torch.library.register_fake("sae_kernels::threshold_encode", lib=_lib)
def _(x, W_enc, b_enc, threshold, cap, band, band_cap, impl):
    B = x.shape[0]
    return (x.new_empty(B, cap), x.new_empty(B, cap, dtype=torch.int64), x.new_empty(B, dtype=torch.int64),
            x.new_empty(B, band_cap, dtype=torch.float32), x.new_empty(B, band_cap, dtype=torch.int64),
            x.new_empty(B, dtype=torch.int64))


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


def _suffix_sum(grad_out: torch.Tensor) -> torch.Tensor:
    """[G, B, d] fp32: entry g is the sum of the cotangents of prefixes g, g+1, ..., G-1, the
    cotangent of a latent of group g (every prefix from its own on contains it)."""
    return grad_out.float().flip(0).cumsum(0).flip(0)


def _group_codes(
    values: torch.Tensor, indices: torch.Tensor, boundaries: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The code split by prefix group, as ``[G * B, k]`` values and indices: row ``g * B + b``
    keeps row b's slots of group g and empties the others, so that the plain gather-dot and
    segmented row sums apply against a ``[G * B, d]`` cotangent."""
    B, k = indices.shape
    bounds = torch.tensor(boundaries, dtype=torch.int64, device=indices.device)
    group = reference.prefix_group(indices, bounds)
    mine = (group == torch.arange(len(boundaries), device=indices.device)[:, None, None]) & (indices >= 0)
    idx_g = torch.where(mine, indices, reference.EMPTY).reshape(-1, k)
    val_g = torch.where(mine, values, torch.zeros((), dtype=values.dtype, device=values.device)).reshape(-1, k)
    return val_g, idx_g


def _prefix_grads(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor,
    boundaries: list[int], impl: str, need_values: bool = True, need_weight: bool = True,
) -> tuple[torch.Tensor | None, RowSparseGrad | None]:
    """Backward of ``prefix_decode``: (dvalues [B, k] in the values' dtype, dW_dec row-sparse).

    Suffix sums over groups, then the decoder's gather-dot and segmented row sums on the
    per-group code; with one group this is exactly ``sparse_decode``'s backward."""
    G, B, d = grad_out.shape
    k = indices.shape[1]
    if G == 1:
        g, val_g, idx_g = grad_out[0], values, indices
    else:
        g = _suffix_sum(grad_out).reshape(G * B, d)
        val_g, idx_g = _group_codes(values, indices, boundaries)
    dvalues = dW = None
    if need_values:
        # Each slot is live in exactly one group: the sum over groups adds exact zeros.
        dots = torch.ops.sae_kernels.gather_dot(g, idx_g, W_dec, impl)
        dvalues = (dots if G == 1 else dots.view(G, B, k).sum(0)).to(values.dtype)
    if need_weight:
        dW = _decoder_weight_grad(val_g, idx_g, g, impl)
    return dvalues, dW


def prefix_decode_backward(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    boundaries: list[int],
    *,
    impl: Impl = "auto",
) -> DecodeGrads:
    """Backward of ``prefix_decode`` in row-sparse form. grad_out: [G, B, d]; values, indices: [B, k].

    ``dvalues[b, j] = dot(S[g, b], W_dec[indices[b, j]])`` and ``dW_dec[i] = sum_b values[b, j]
    S[g, b]`` over the slots holding latent i, where g is the slot's group and
    ``S[g] = sum_{g' >= g} grad_out[g']``."""
    check_code(values, indices, W_dec)
    sizes = check_boundaries(boundaries, W_dec.shape[0])
    if grad_out.shape != (len(sizes), values.shape[0], W_dec.shape[1]):
        raise ValueError(f"grad_out must have shape [G, B, d] = {(len(sizes), values.shape[0], W_dec.shape[1])}, "
                         f"got {tuple(grad_out.shape)}")
    impl = _resolve(impl, grad_out.device)
    dvalues, dW = _prefix_grads(grad_out, values, indices.long(), W_dec, sizes, impl)
    return DecodeGrads(dvalues, dW)


def _threshold_preactivation_grad(grad_values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[B, cap] fp32 gradient of the active pre-activations: JumpReLU passes it through
    unchanged wherever the latent is active (value = pre there), and empty slots get none."""
    return grad_values.float() * (indices >= 0)


def threshold_encode_backward(
    grad_values: torch.Tensor,
    indices: torch.Tensor,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    *,
    impl: Impl = "auto",
) -> EncodeGrads:
    """Backward of ``threshold_encode``'s values in row-sparse form (dx, dW_enc, db_enc).

    grad_values, indices: [B, cap]. The threshold's gradient is not part of it (see
    ``threshold_encode``)."""
    impl = _resolve(impl, x.device)
    g_pre = _threshold_preactivation_grad(grad_values, indices)
    return EncodeGrads(_encoder_input_grad(g_pre, indices, W_enc, x.dtype, impl),
                       _encoder_weight_grad(g_pre, indices, x, impl))


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


def _prefix_setup(ctx, inputs, output):
    values, indices, W_dec, boundaries, impl = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.boundaries = list(boundaries)
    ctx.impl = impl


def _prefix_backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    need_v, _, need_w = ctx.needs_input_grad[:3]
    dvalues, dW = _prefix_grads(grad_out, values, indices, W_dec, ctx.boundaries, ctx.impl, need_v, need_w)
    if dW is not None:
        dW = dW.to_dense(W_dec.shape[0]).to(W_dec.dtype)
    return dvalues, None, dW, None, None


def _threshold_setup(ctx, inputs, output):
    x, W_enc, b_enc, threshold, cap, band, band_cap, impl = inputs
    ctx.mark_non_differentiable(*output[1:])  # counts, lists of indices, band pre-activations
    ctx.save_for_backward(x, W_enc, output[1])
    ctx.impl = impl
    ctx.b_dtype = b_enc.dtype


def _threshold_backward(ctx, grad_values, *_):
    x, W_enc, indices = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    g_pre = _threshold_preactivation_grad(grad_values, indices)
    dx = dW = db = None
    if need_x:
        dx = _encoder_input_grad(g_pre, indices, W_enc, x.dtype, ctx.impl)
    if need_w or need_b:
        grad = _encoder_weight_grad(g_pre, indices, x, ctx.impl)
        n = W_enc.shape[0]
        dW = grad.to_dense(n).to(W_enc.dtype) if need_w else None
        db = grad.bias_to_dense(n).to(ctx.b_dtype) if need_b else None
    # No gradient for the threshold: its pseudo-gradient is the caller's (threshold_encode).
    return dx, dW, db, None, None, None, None, None


torch.library.register_autograd("sae_kernels::topk_encode", _encode_backward, setup_context=_encode_setup, lib=_lib)
torch.library.register_autograd("sae_kernels::prefix_decode", _prefix_backward, setup_context=_prefix_setup,
                                lib=_lib)
torch.library.register_autograd("sae_kernels::threshold_encode", _threshold_backward,
                                setup_context=_threshold_setup, lib=_lib)
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


def prefix_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    boundaries: list[int],
    *,
    impl: Impl = "auto",
) -> torch.Tensor:
    """Matryoshka partial reconstructions of every nested prefix of the dictionary.

    ``out[g, b] = sum over slots j with 0 <= indices[b, j] < m_g of values[b, j] *
    W_dec[indices[b, j]]``: prefix g holds the latents ``0 .. m_g - 1``, so ``out[G - 1]`` is
    ``sparse_decode``'s reconstruction. Each row's slots are taken in index order and the
    running sum is emitted at every boundary, in one pass; ``[B, n]`` is never built.

    Args:
        values: [B, k] float; indices: [B, k] integer in [-1, n), -1 (empty) skipped;
            W_dec: [n, d].
        boundaries: the prefix sizes ``m_1 < m_2 < ... < m_G = n`` (a sequence of ints).
        impl: "auto", "triton", "chunked" or "reference" (see the module docstring).

    Returns:
        [G, B, d] in ``torch.promote_types(values.dtype, W_dec.dtype)``, accumulated in fp32
        (the chunked path sums each group in W_dec's dtype, then the groups in fp32). With one
        boundary (``[n]``) the result is ``sparse_decode(...)[None]`` exactly, gradients too.

    Differentiable in values and W_dec: the cotangent of a latent of group g is the sum of the
    cotangents of prefixes g..G-1 (a suffix sum), then the decoder's sparse backward
    (``prefix_decode_backward`` gives it in row-sparse form).
    """
    check_code(values, indices, W_dec)
    sizes = check_boundaries(boundaries, W_dec.shape[0])
    impl = _resolve(impl, values.device)
    return torch.ops.sae_kernels.prefix_decode(values, indices.long(), W_dec, sizes, impl)


class ThresholdCode(NamedTuple):
    """What ``threshold_encode`` returns. B rows; lists in ascending latent index order.

    values: [B, cap] in x's dtype, the pre-activations of the active latents (0 in unused slots).
    indices: [B, cap] int64, their latent ids (-1 in unused slots).
    counts: [B] int64, the exact number of active latents in each row (may exceed cap).
    overflow: [B] bool, ``counts > cap``: the row kept only its ``cap`` lowest-index latents.
    band_pre: [B, band_cap] fp32, pre-activations with ``|pre - threshold| < band / 2``.
    band_indices: [B, band_cap] int64, their latent ids (-1 in unused slots).
    band_counts: [B] int64, exact; band_overflow: [B] bool, ``band_counts > band_cap``.
    Without a band the band lists have width 0 and the counts are 0.
    """

    values: torch.Tensor
    indices: torch.Tensor
    counts: torch.Tensor
    overflow: torch.Tensor
    band_pre: torch.Tensor
    band_indices: torch.Tensor
    band_counts: torch.Tensor
    band_overflow: torch.Tensor


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    cap: int,
    *,
    band: float | None = None,
    band_cap: int | None = None,
    impl: Impl = "auto",
) -> ThresholdCode:
    """JumpReLU sparse code: the latents whose pre-activation exceeds their threshold.

    ``pre = x @ W_enc.T + b_enc`` (fp32 accumulation); latent i is active in row b when
    ``pre[b, i] > threshold[i]`` (equality is inactive), with value ``pre[b, i]``. Per row, the
    active latents in ascending index order, up to ``cap`` (on overflow the ``cap`` lowest
    indices are kept and ``overflow`` is set; ``counts`` stays exact). The GEMM, the compare and
    the compaction are fused: ``[B, n]`` is never built outside ``impl="reference"``. The
    chunked path compares ``x @ W_enc.T`` against ``threshold - b_enc`` (both fp32) and adds the
    bias to the listed values, so at the threshold its decision may differ from the others' by
    one fp32 rounding; for bf16 inputs on CPUs with bf16 units (``chunked.gemm_dtype``) the
    product is rounded to bf16 first.

    Args:
        x: [B, d] activations (fp32, bf16 or fp16); W_enc: [n, d], same dtype; b_enc: [n];
            threshold: [n] float (compared in fp32).
        cap: slots per row, >= 1.
        band: if given, also list the latents with ``|pre - threshold| < band / 2`` (fp32),
            the support of the rectangle kernel of width ``band`` that the threshold's
            pseudo-gradient needs (Rajamanoharan et al. 2024, "Jumping Ahead").
        band_cap: slots per row for the band list (default: cap).
        impl: "auto", "triton", "chunked" or "reference" (see the module docstring).

    Returns:
        A :class:`ThresholdCode`. Empty slots hold value 0 and index -1, which ``sparse_decode``
        and every backward pass skip, so ``(values, indices)`` decodes like a top-k code.

    Gradients: ``values`` is differentiable in x, W_enc and b_enc (straight through where
    active, sparse like ``topk_encode``'s backward); the other outputs carry none. The threshold
    gets no gradient here; with ``K(u) = 1[|u| < 1/2]``, ``eps = band`` and ``v_b`` the value
    of latent i in row b, the rectangle-kernel pseudo-gradients are

        d v_b / d threshold_i = -(threshold_i / eps) K((pre_bi - threshold_i) / eps)
        d H(pre_bi - threshold_i) / d threshold_i = -(1 / eps) K((pre_bi - threshold_i) / eps)

    so over the band list: ``dL/dthreshold_i = -(1/eps) * sum over band entries (b, i) of
    (threshold_i * dL/dv_bi + lambda)`` for the loss ``recon + lambda * L0``, where
    ``dL/dv_bi = dot(dL/dx_hat[b], W_dec[i])`` (``gather_dot`` over the band indices, which
    may be inactive latents).
    """
    check_threshold_inputs(x, W_enc, b_enc, threshold, cap, band, band_cap)
    impl = _resolve(impl, x.device)
    width = (cap if band_cap is None else band_cap) if band is not None else 0
    values, indices, counts, band_pre, band_idx, band_counts = torch.ops.sae_kernels.threshold_encode(
        x, W_enc, b_enc, threshold, int(cap), None if band is None else float(band), int(width), impl)
    return ThresholdCode(values, indices, counts, counts > cap, band_pre, band_idx, band_counts,
                         band_counts > width)
