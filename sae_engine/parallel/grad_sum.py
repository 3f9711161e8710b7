"""One training step's gradients summed over the data ranks, in three collectives.

The dense gradients (b_dec, W_skip) are flattened into one bucket, as DDP does, and its
all-reduce is started first and waited for last, so it runs while the row-sparse gradients
are exchanged. Those (W_enc with b_enc, W_dec; each rank's own touched rows) take one
all-gather of every rank's row counts, then either one all-gather of every rank's touched
rows, packed into one byte buffer, or one dense all-reduce when that sends fewer bytes.

The sums are those of summing each gradient on its own: the same numbers added in the same
(rank) order.
"""
from __future__ import annotations

import torch

from sae_kernels import RowSparseGrad

from .comm import Comm


def sum_over_data(grads: dict, comm: Comm, n_local: int, allow_dense: bool) -> dict:
    """Every data rank's gradients summed; the same on every rank.

    grads: "W_enc" (RowSparseGrad [U, d_in] with b_enc's gradient), "W_dec" (RowSparseGrad
    [U', d_out]) over this rank's ``n_local`` latent rows, and dense tensors (b_dec [d_out],
    W_skip [d_out, d_in]). allow_dense: whether the row-sparse sums may come back with every
    row (the dense optimizer reads them as dense anyway; the row-sparse one would update
    untouched rows).
    """
    if comm.size == 1:
        return grads
    dense = {name: g for name, g in grads.items() if isinstance(g, torch.Tensor)}
    bucket = comm.start_all_reduce(torch.cat([g.flatten() for g in dense.values()]))
    out: dict = _sum_rows(grads["W_enc"], grads["W_dec"], comm, n_local, allow_dense)
    for (name, g), summed in zip(dense.items(), bucket.wait().split([g.numel() for g in dense.values()])):
        out[name] = summed.view_as(g)
    return out


def _sum_rows(enc: RowSparseGrad, dec: RowSparseGrad, comm: Comm, n_local: int,
              allow_dense: bool) -> dict[str, RowSparseGrad]:
    """W_enc (with b_enc) and W_dec summed over ``comm``: touched rows only, or dense."""
    d_in, d_out = enc.grad.shape[1], dec.grad.shape[1]
    # The backward gives W_enc and W_dec the same rows (every code's latents): one row list serves both.
    shared = torch.equal(enc.rows, dec.rows)
    layouts = comm.all_gather(torch.tensor([enc.rows.numel(), dec.rows.numel(), int(shared)],
                                           device=enc.rows.device)).tolist()
    sizes = [_packed_bytes(m_enc, m_dec, bool(same), d_in, d_out) for m_enc, m_dec, same in layouts]
    sparse_bytes = (comm.size - 1) * max(sizes)
    dense_bytes = 2 * (comm.size - 1) * n_local * (d_in + 1 + d_out) * 4 // comm.size
    if allow_dense and dense_bytes < sparse_bytes:
        summed = comm.all_reduce(torch.cat(
            [enc.to_dense(n_local), enc.bias_to_dense(n_local).unsqueeze(1), dec.to_dense(n_local)], dim=1))
        rows = torch.arange(n_local, device=enc.rows.device)
        return {"W_enc": RowSparseGrad(rows, summed[:, :d_in], summed[:, d_in]),
                "W_dec": RowSparseGrad(rows, summed[:, d_in + 1 :])}
    payloads = comm.all_gather_rows(_pack(enc, dec, shared), sizes)
    parts = [_unpack(payload, *layout, d_in, d_out) for payload, layout in zip(payloads, layouts)]
    enc_rows, enc_sum = _sum_by_row([p[0] for p in parts], [p[2] for p in parts])
    if all(same for _, _, same in layouts):
        dec_rows, dec_sum = _sum_by_row([p[0] for p in parts], [p[3] for p in parts])
    else:
        dec_rows, dec_sum = _sum_by_row([p[1] for p in parts], [p[3] for p in parts])
    return {"W_enc": RowSparseGrad(enc_rows, enc_sum[:, :d_in], enc_sum[:, d_in]),
            "W_dec": RowSparseGrad(dec_rows, dec_sum)}


def _sum_by_row(rows: list[torch.Tensor], grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-ordered row lists [m_r] and their gradients [m_r, w] -> (unique rows [U] ascending, sums [U, w])."""
    unique, inverse = torch.unique(torch.cat(rows), sorted=True, return_inverse=True)
    every = torch.cat(grads)
    return unique, every.new_zeros(unique.numel(), every.shape[1]).index_add_(0, inverse, every)


def _packed_bytes(m_enc: int, m_dec: int, shared: bool, d_in: int, d_out: int) -> int:
    """Size of ``_pack``'s buffer: int64 rows (once when shared), fp32 rows of [W_enc | b_enc] and W_dec."""
    return 8 * (m_enc + (0 if shared else m_dec)) + 4 * (m_enc * (d_in + 1) + m_dec * d_out)


def _pack(enc: RowSparseGrad, dec: RowSparseGrad, shared: bool) -> torch.Tensor:
    """One rank's row-sparse gradients as one byte buffer, so that one all-gather moves them:
    enc rows, dec rows (unless shared), [W_enc | b_enc] rows, W_dec rows."""
    parts = [enc.rows] if shared else [enc.rows, dec.rows]
    parts += [torch.cat([enc.grad, enc.bias_grad.unsqueeze(1)], dim=1), dec.grad]
    return torch.cat([p.contiguous().view(-1).view(torch.uint8) for p in parts])


def _unpack(payload: torch.Tensor, m_enc: int, m_dec: int, shared: int, d_in: int, d_out: int):
    """``_pack``'s buffer back: (enc rows [m_enc], dec rows [m_dec], [W_enc | b_enc] rows
    [m_enc, d_in + 1], W_dec rows [m_dec, d_out])."""
    sizes = [8 * m_enc, 0 if shared else 8 * m_dec, 4 * m_enc * (d_in + 1), 4 * m_dec * d_out]
    # Copies: a slice of a byte buffer may not sit at an offset its dtype can be viewed at.
    enc_rows, dec_rows, enc_grad, dec_grad = (p.clone() for p in payload.split(sizes))
    enc_rows = enc_rows.view(torch.int64)
    dec_rows = enc_rows if shared else dec_rows.view(torch.int64)
    return (enc_rows, dec_rows, enc_grad.view(torch.float32).view(m_enc, d_in + 1),
            dec_grad.view(torch.float32).view(m_dec, d_out))
