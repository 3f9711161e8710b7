"""Plain-PyTorch reference implementations: the oracle every fast path is tested against.

They materialize the full ``[B, n]`` pre-activations, so they are only for small shapes.
Semantics shared by every implementation:

* ``topk_encode``: per row, the ``k`` largest pre-activations ``x @ W_enc.T + b_enc``
  (computed in fp32) among latents whose ``latent_mask`` entry is true, sorted descending,
  passed through ReLU and cast to ``x.dtype``. Ties go to the smaller latent index. When
  fewer than ``k`` latents are eligible, the remaining slots hold value 0 and index -1.
* ``sparse_decode``: ``out[b] = sum_j values[b, j] * W_dec[indices[b, j]]``; slots with
  index -1 contribute nothing.
"""
from __future__ import annotations

import torch

EMPTY = -1  # index of an empty slot in a sparse code


def _topk_lowest_index_on_ties(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along dim 1 where equal values are ordered by ascending index. pre: [B, n] fp32."""
    # A stable descending sort keeps equal values in index order.
    order = torch.sort(pre, dim=1, descending=True, stable=True).indices[:, :k]
    return pre.gather(1, order), order


def topk_encode_ref(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    latent_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-k encoder. x: [B, d], W_enc: [n, d], b_enc: [n] -> ([B, k], [B, k] int64)."""
    pre = x.float() @ W_enc.float().T + b_enc.float()
    if latent_mask is not None:
        pre = pre.masked_fill(~latent_mask.bool(), float("-inf"))
    top, idx = _topk_lowest_index_on_ties(pre, k)
    empty = torch.isneginf(top)
    idx = idx.masked_fill(empty, EMPTY)
    values = top.clamp_min(0).masked_fill(empty, 0).to(x.dtype)
    return values, idx


def sparse_decode_ref(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Reference decoder. values, indices: [B, k], W_dec: [n, d] -> [B, d] in the promoted dtype."""
    out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
    valid = indices >= 0
    rows = W_dec.float()[indices.clamp_min(0)]  # [B, k, d]
    coeff = values.float() * valid
    return torch.einsum("bk,bkd->bd", coeff, rows).to(out_dtype)


def gather_dot_ref(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Reference gather-dot: ``dot(g[b], W[indices[b, j]])`` in fp32, 0 for empty slots.
    g: [B, d], indices: [B, k], W: [n, d] -> [B, k] fp32 (builds the [B, k, d] gather)."""
    dots = torch.einsum("bd,bkd->bk", g.float(), W.float()[indices.clamp_min(0)])
    return dots * (indices >= 0)


def segment_rows_ref(
    coeff: torch.Tensor, indices: torch.Tensor, src: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference sparse-transpose product over the selected rows.

    ``grads[u] = sum_{(b, j): indices[b, j] == rows[u]} coeff[b, j] * src[b]`` and
    ``sums[u]`` the sum of those coeff. coeff, indices: [B, k]; src: [B, d] ->
    (rows [U] int64 ascending, grads [U, d] fp32, sums [U] fp32).
    """
    valid = (indices >= 0).reshape(-1)
    flat = indices.reshape(-1)[valid]
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    weights = coeff.reshape(-1).float()[valid]
    tokens = torch.arange(indices.shape[0], device=src.device).repeat_interleave(indices.shape[1])[valid]
    contrib = weights[:, None] * src.float()[tokens]
    grads = torch.zeros(rows.numel(), src.shape[1], device=src.device).index_add_(0, inverse, contrib)
    sums = torch.zeros(rows.numel(), device=src.device).index_add_(0, inverse, weights)
    return rows, grads, sums


def prefix_group(indices: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Group of each latent index: g with m_{g-1} <= index < m_g (boundaries = [m_1, ..., m_G]
    as an int64 tensor, m_0 = 0); empty slots (-1) count as group 0."""
    return torch.searchsorted(boundaries, indices.clamp_min(0), right=True)


def prefix_decode_ref(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, boundaries: list[int]
) -> torch.Tensor:
    """Reference prefix decoder: ``out[g] = dense_code[:, :m_g] @ W_dec[:m_g]``.

    values, indices: [B, k]; W_dec: [n, d]; boundaries: [m_1 < ... < m_G = n] ->
    [G, B, d] in the promoted dtype. Builds the dense [B, n] code (an oracle, not a fast path).
    """
    B, n = values.shape[0], W_dec.shape[0]
    out_dtype = torch.promote_types(values.dtype, W_dec.dtype)
    valid = indices >= 0
    dense = torch.zeros(B, n, dtype=torch.float32, device=values.device)
    dense.index_put_((torch.arange(B, device=values.device)[:, None].expand_as(indices)[valid], indices[valid]),
                     values.float()[valid], accumulate=True)
    W = W_dec.float()
    return torch.stack([dense[:, :m] @ W[:m] for m in boundaries]).to(out_dtype)


def threshold_encode_ref(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    cap: int,
    band: float | None = None,
    band_cap: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Reference JumpReLU encoder from the dense fp32 pre-activations ``x @ W_enc.T + b_enc``.

    A latent is active where ``pre > threshold`` (equality is inactive). Per row, the first
    ``cap`` active latents in ascending index order, and (when ``band`` is given) the first
    ``band_cap`` latents with ``|pre - threshold| < band / 2``. Returns ``(values [B, cap]
    x.dtype, indices [B, cap] int64, counts [B] int64, band_pre [B, band_cap] fp32,
    band_indices [B, band_cap] int64, band_counts [B] int64)``; unused slots hold 0 and -1, and
    without a band the band tensors have width 0.
    """
    pre = x.float() @ W_enc.float().T + b_enc.float()
    thr = threshold.float()
    values, indices, counts = _first_per_row(pre, pre > thr, cap)
    if band is None:
        empty = torch.zeros(x.shape[0], 0, device=x.device)
        band_pre, band_idx, band_counts = empty, empty.long(), torch.zeros(x.shape[0], dtype=torch.int64,
                                                                            device=x.device)
    else:
        band_pre, band_idx, band_counts = _first_per_row(pre, (pre - thr).abs() < band / 2, band_cap)
    return values.to(x.dtype), indices, counts, band_pre, band_idx, band_counts


def _first_per_row(pre: torch.Tensor, mask: torch.Tensor, cap: int) -> tuple[torch.Tensor, ...]:
    """The first ``cap`` masked entries of each row of ``pre[B, n]`` by column:
    (values [B, cap] fp32, columns [B, cap] int64, counts [B] int64); unused slots 0 / -1."""
    B, n = pre.shape
    counts = mask.sum(dim=1)
    # A stable sort of (not masked) puts the masked columns first, in column order.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :cap]
    used = torch.arange(min(cap, n), device=pre.device)[None, :] < counts[:, None]
    cols = torch.full((B, cap), EMPTY, dtype=torch.int64, device=pre.device)
    vals = torch.zeros(B, cap, device=pre.device)
    cols[:, : order.shape[1]] = order.masked_fill(~used, EMPTY)
    vals[:, : order.shape[1]] = pre.gather(1, order).masked_fill(~used, 0)
    return vals, cols, counts
