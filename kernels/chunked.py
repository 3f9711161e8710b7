"""Chunked PyTorch implementations: the CPU path, and the GPU fallback for very large k.

Nothing here materializes a ``[B, n]`` tensor for the whole batch. The encoder computes the
pre-activations of ``rows_per_chunk`` rows at a time into one reused buffer (reuse avoids the
page faults of fresh large allocations) and selects the top k of each chunk. For wide
rows the selection is two-level, which reads the chunk once instead of running a selection
over every element:

1. split each row into groups of ``GROUP`` latents and take every group's maximum;
2. keep the ``k`` groups with the largest maxima: the ``k``-th largest group maximum is a lower
   bound on the ``k``-th largest element, so every top-k element lies in one of those groups;
3. select the top k among the ``k * GROUP`` surviving candidates.

Narrow rows (fewer than ``TWO_LEVEL_MIN_GROUPS_PER_K * k`` groups) use ``torch.topk`` on the
chunk directly. Values are exact either way; among exactly equal
pre-activations at the k-th place, which index is kept is deterministic but unspecified here
(the reference and Triton paths keep the smaller index).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .reference import EMPTY

GROUP = 64  # latents per group in the two-level selection
TWO_LEVEL_MIN_GROUPS_PER_K = 16
CHUNK_ELEMENTS = 1 << 25  # pre-activation buffer size (128 MiB in fp32)


def rows_per_chunk(n: int, B: int, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows whose ``[rows, n]`` pre-activations fit the element budget (at least 1, at most B)."""
    return max(1, min(B, budget // max(n, 1)))


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``pre[R, n]``. -> (values [R, k] sorted descending, columns [R, k] int64)."""
    R, n = pre.shape
    n_groups = n // GROUP
    # Measured crossover: below ~16 groups per selected latent, one topk pass is faster.
    if n_groups < TWO_LEVEL_MIN_GROUPS_PER_K * k:
        return pre.topk(k, dim=1)
    n_full = n_groups * GROUP
    grouped = pre[:, :n_full].unflatten(1, (n_groups, GROUP))
    groups = grouped.amax(dim=2).topk(k, dim=1, sorted=False).indices  # [R, k]
    # Whole groups gathered through a view: no [R, k * GROUP] index arithmetic.
    candidates = grouped.gather(1, groups.unsqueeze(2).expand(-1, -1, GROUP)).flatten(1)
    if n > n_full:  # the short last group always competes
        candidates = torch.cat([candidates, pre[:, n_full:]], dim=1)
    top, pos = candidates.topk(k, dim=1)
    in_group = pos < k * GROUP
    from_groups = groups.gather(1, (pos // GROUP).clamp_max(k - 1)) * GROUP + pos % GROUP
    return top, torch.where(in_group, from_groups, n_full + pos - k * GROUP)


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    latent_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked fused-in-spirit top-k encoder. x: [B, d], W_enc: [n, d], b_enc: [n] -> ([B, k], [B, k]).

    The GEMM runs in x's dtype (bf16 uses the CPU's bf16 matrix units); selection happens on
    the GEMM's output, so bf16 inputs select on bf16-rounded pre-activations.
    """
    B, n = x.shape[0], W_enc.shape[0]
    bias = b_enc.to(x.dtype)
    if latent_mask is not None:
        # Masked latents get -inf through the bias, so the GEMM itself excludes them.
        bias = bias.masked_fill(~latent_mask.bool(), float("-inf"))
    rows = rows_per_chunk(n, B)
    buffer = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    W_t = W_enc.T
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        pre = buffer[: stop - start]
        torch.addmm(bias, x[start:stop], W_t, out=pre)
        top, idx = select_topk(pre, k)
        values[start:stop] = top
        indices[start:stop] = idx
    empty = torch.isneginf(values)
    indices.masked_fill_(empty, EMPTY)
    values.clamp_(min=0).masked_fill_(empty, 0)
    return values, indices


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j values[b, j] * W[indices[b, j]]``, empty slots skipped. -> [B, d].

    embedding_bag gathers and sums rows without building the [B, k, d] tensor.
    """
    out_dtype = torch.promote_types(values.dtype, W.dtype)
    weights = (values * (indices >= 0)).to(W.dtype)
    out = F.embedding_bag(indices.clamp_min(0), W, per_sample_weights=weights, mode="sum")
    return out.to(out_dtype)


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``dot(g[b], W[indices[b, j]])`` in fp32, 0 for empty slots. g: [B, d] -> [B, k].

    A sampled matrix product: ``g @ W.T`` evaluated only at the B*k positions of the code
    (a CSR pattern), without gathering a [B, k, d] tensor.
    """
    B, k = indices.shape
    crow = torch.arange(0, B * k + 1, k, device=g.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, indices.clamp_min(0).reshape(-1), torch.zeros(B * k, device=g.device),
            size=(B, W.shape[0]), check_invariants=False,
        )
        dots = torch.sparse.sampled_addmm(pattern, g.float(), W.float().T, beta=0.0)
    return dots.values().view(B, k) * (indices >= 0)


def segment_rows(
    coeff: torch.Tensor, indices: torch.Tensor, src: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse-transpose product over the rows that were selected.

    ``grads[u] = sum_{(b, j): indices[b, j] == rows[u]} coeff[b, j] * src[b]`` and
    ``coeff_sums[u] = sum of those coeff``. coeff, indices: [B, k]; src: [B, d] ->
    (rows [U] int64 ascending, grads [U, d] fp32, coeff_sums [U] fp32).
    A CSR matrix [U, B] times src: each output row is summed by one thread in a fixed order,
    so the result is deterministic.
    """
    B, k = indices.shape
    flat = indices.reshape(-1)
    keep = flat >= 0
    flat = flat[keep]
    tokens = torch.arange(B, device=src.device).repeat_interleave(k)[keep]
    weights = coeff.reshape(-1).float()[keep]
    # Unique rows by counting (latent ids are small integers), not by sorting.
    n_bins = int(flat.max()) + 1 if flat.numel() else 0
    counts = torch.bincount(flat, minlength=n_bins)
    present = counts > 0
    rows = present.nonzero().squeeze(1)
    inverse = (torch.cumsum(present, 0) - 1)[flat]
    U = rows.numel()
    order = torch.sort(inverse.int(), stable=True).indices
    crow = torch.zeros(U + 1, dtype=torch.int64, device=src.device)
    torch.cumsum(counts[present], 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(
            crow, tokens[order], weights[order], size=(U, B), check_invariants=False
        )
        grads = matrix @ src.float()
    coeff_sums = torch.zeros(U, dtype=torch.float32, device=src.device).index_add_(0, inverse, weights)
    return rows, grads, coeff_sums
