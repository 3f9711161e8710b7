"""The initial rows [lo, hi) of a TorchSAE, drawn without the whole matrix.

``TorchSAE`` draws ``W_dec = randn(n, d_out)`` (then ``W_enc = randn(n, d_in) / sqrt(d_in)`` for
a transcoder) from one CPU generator. torch's CPU normal sampler fills a tensor in groups of 16
numbers, so drawing the same matrix in blocks of whole 16-row groups, the last block running to
the matrix's end, yields the same numbers: a rank draws block by block and keeps only its rows
(time O(n d), memory O(block)), and a sharded run starts from exactly the single-process weights.
"""
from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 22  # numbers drawn per block


def _block_bounds(n: int, d: int) -> list[int]:
    """Row bounds of the blocks: whole 16-row groups, the last one at least 16 numbers long."""
    rows = max(16, (BLOCK_ELEMENTS // max(d, 1)) // 16 * 16)
    bounds = list(range(0, n, rows)) + [n]
    if len(bounds) > 2 and (n - bounds[-2]) * d < 16:
        del bounds[-2]
    return bounds


def normal_rows(generator: torch.Generator, n: int, d: int, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of ``torch.randn(n, d, generator=generator)``; advances the generator as that call would."""
    kept = []
    bounds = _block_bounds(n, d)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        block = torch.randn(stop - start, d, generator=generator)
        if start < hi and stop > lo:
            kept.append(block[max(lo - start, 0) : min(hi, stop) - start])
    return torch.cat(kept) if kept else torch.empty(0, d)


def initial_rows(n: int, d_in: int, d_out: int, transcoder: bool, seed: int, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """TorchSAE's initial W_enc and W_dec rows [lo, hi) for ``train.seed = seed``."""
    generator = torch.Generator().manual_seed(seed)
    W_dec = normal_rows(generator, n, d_out, lo, hi)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = normal_rows(generator, n, d_in, lo, hi) / d_in**0.5 if transcoder else W_dec.clone()
    return {"W_enc": W_enc, "W_dec": W_dec}
