"""Exact top-k over latents split across ranks, and the decoder of a split code.

Each latent rank holds the contiguous rows ``[lo, hi)`` of ``W_enc``, ``b_enc`` and ``W_dec``.
Per row of the batch:

1. the rank selects its own top k with ``sae_kernels.topk_encode`` (only its rows: no [B, n]);
2. the L*k candidates of all ranks are all-gathered as (key, global index): 12 bytes each;
3. every rank keeps the same k: keys descending, equal keys by the smaller global index, empty
   slots last. That is ``topk_encode``'s own rule, so the result equals one process's
   ``topk_encode`` over the whole matrix (with the tie-exact "reference" or "triton" paths);
4. each rank decodes only the winners it owns and the partial reconstructions are summed.

The key is the pre-activation. ``topk_encode`` returns values after ReLU, which equal the
pre-activation where positive; for the few candidates whose value is 0 the pre-activation is
recomputed from their row (one dot product each), so candidates below zero still merge in
the order one process would give them. Exactness assumes fp32 keys: with bf16 inputs the
Triton path orders by fp32 pre-activations that bf16 values no longer tell apart.
"""
from __future__ import annotations

import torch

import sae_kernels
from sae_kernels import EMPTY

from .comm import Comm


def local_candidates(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    row_ids: torch.Tensor,
    *,
    latent_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's top-k candidates over its rows. -> (keys [B, k] fp32, global indices [B, k]).

    x: [B, d]; W_enc: [m, d] and b_enc: [m] this rank's rows (m may be 0); row_ids: [m] their
    global latent ids, ascending. Empty slots have key -inf and index EMPTY.
    """
    B, m = x.shape[0], W_enc.shape[0]
    keys = torch.full((B, k), float("-inf"), device=x.device)
    indices = torch.full((B, k), EMPTY, dtype=torch.int64, device=x.device)
    if m == 0:
        return keys, indices
    local_k = min(k, m)
    values, local = sae_kernels.topk_encode(x, W_enc, b_enc, local_k, latent_mask=latent_mask, impl=impl)
    found = local >= 0
    keys[:, :local_k] = torch.where(found, values.float(), float("-inf"))
    indices[:, :local_k] = torch.where(found, row_ids[local.clamp_min(0)], EMPTY)
    below = ((values == 0) & found).nonzero()
    if below.numel():  # pre-activations at or below zero: recompute them for the order
        rows, slots = below[:, 0], below[:, 1]
        latent = local[rows, slots]
        pre = torch.einsum("ud,ud->u", x[rows].float(), W_enc[latent].float()) + b_enc[latent].float()
        keys[rows, slots] = pre.clamp_max(0.0)
    return keys, indices


def merge_candidates(keys: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of candidate sets: keys descending, ties by smaller index, empty slots last.

    keys: [B, C] fp32 (-inf: empty); indices: [B, C] global ids or EMPTY; C >= k.
    -> (values [B, k] fp32 with ReLU applied, indices [B, k]; empty slots 0 / EMPTY).
    """
    by_index = torch.where(indices >= 0, indices, torch.iinfo(torch.int64).max).argsort(dim=1, stable=True)
    keys, indices = keys.gather(1, by_index), indices.gather(1, by_index)
    order = keys.argsort(dim=1, descending=True, stable=True)[:, :k]
    top, chosen = keys.gather(1, order), indices.gather(1, order)
    empty = torch.isneginf(top)
    return top.clamp_min(0).masked_fill(empty, 0), chosen.masked_fill(empty, EMPTY)


def sharded_topk(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    row_ids: torch.Tensor,
    comm: Comm,
    *,
    latent_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_encode`` over the rows of every rank in ``comm``. -> (values [B, k] in x's dtype,
    global indices [B, k]), the same on every rank. Arguments as in ``local_candidates``."""
    keys, indices = local_candidates(x, W_enc, b_enc, k, row_ids, latent_mask=latent_mask, impl=impl)
    all_keys = comm.all_gather(keys)  # [L, B, k]
    all_indices = comm.all_gather(indices)
    values, chosen = merge_candidates(
        all_keys.permute(1, 0, 2).reshape(x.shape[0], -1), all_indices.permute(1, 0, 2).reshape(x.shape[0], -1), k
    )
    return values.to(x.dtype), chosen


def owned(indices: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Global indices [B, k] as this rank's local rows; slots owned elsewhere become EMPTY."""
    mine = (indices >= lo) & (indices < hi)
    return torch.where(mine, indices - lo, EMPTY)


def sharded_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, lo: int, comm: Comm
) -> torch.Tensor:
    """``sparse_decode`` of a code with global indices over the decoder rows of every rank.

    values, indices: [B, k] (the same on every rank); W_dec: [hi - lo, d] this rank's rows.
    -> [B, d] fp32, the sum of every rank's owned part (the same on every rank).
    """
    part = sae_kernels.sparse_decode(values, owned(indices, lo, lo + W_dec.shape[0]), W_dec).float()
    return comm.all_reduce(part)
