"""Initialisation: the initial weights (every backend, one process or a latent shard), and the
data-dependent normalisation scale and decoder bias.

The weights come from one CPU generator seeded with ``train.seed``: W_dec = randn(n, d_out)
with unit-norm rows, then W_enc = randn(n, d_in) / sqrt(d_in) for a transcoder (an SAE's encoder
starts as the decoder's transpose, Gao et al. 2024). torch's CPU normal sampler fills a tensor in
groups of 16 numbers, so drawing a matrix in blocks of whole 16-row groups (each at least 16
numbers long) yields the numbers of drawing it at once: a latent shard draws block by block and
keeps only its rows [lo, hi) (time O(n d), memory O(block) beyond its rows), and starts from
exactly the rows of one process's weights.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .backend import LAYER_NORM_EPS

BLOCK_ELEMENTS = 1 << 22  # numbers drawn per block


def _block_bounds(n: int, d: int) -> list[int]:
    """Row bounds of the blocks: whole 16-row groups, the last one at least 16 numbers long."""
    rows = max(16, (BLOCK_ELEMENTS // max(d, 1)) // 16 * 16)
    bounds = list(range(0, n, rows)) + [n]
    if len(bounds) > 2 and (n - bounds[-2]) * d < 16:
        del bounds[-2]
    return bounds


def normal_rows(generator: torch.Generator, n: int, d: int, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of ``torch.randn(n, d, generator=generator)``, [hi - lo, d]; advances the
    generator as that call would."""
    out = torch.empty(hi - lo, d)
    scratch = None  # the blocks outside [lo, hi), drawn and dropped
    bounds = _block_bounds(n, d)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if lo <= start and stop <= hi:  # the block lies in the kept rows: drawn in place
            out[start - lo : stop - lo].normal_(generator=generator)
            continue
        if scratch is None or scratch.shape[0] < stop - start:
            scratch = torch.empty(stop - start, d)
        block = scratch[: stop - start].normal_(generator=generator)
        if start < hi and stop > lo:
            out[max(start, lo) - lo : min(stop, hi) - lo] = block[max(lo - start, 0) : min(hi, stop) - start]
    return out


def initial_weights(m: ModelConfig, seed: int, lo: int = 0, hi: int | None = None) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) (default: all n) of the initial W_enc [n, d_in] and W_dec [n, d_out] for
    ``train.seed = seed``; fp32 on the CPU. See the module docstring."""
    n, d_in, d_out = m.n_latents, m.d_in, m.target_dim
    hi = n if hi is None else hi
    generator = torch.Generator().manual_seed(seed)
    W_dec = normal_rows(generator, n, d_out, lo, hi)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = normal_rows(generator, n, d_in, lo, hi) / d_in**0.5 if m.is_transcoder else W_dec.clone()
    return {"W_enc": W_enc, "W_dec": W_dec}


def mean_squared_norm_scale(sample: torch.Tensor) -> float:
    """Scale that brings a sample's mean squared norm to 1. sample: [N, d]."""
    msn = sample.double().pow(2).sum(dim=1).mean().item()
    if not msn > 0:
        raise ValueError("cannot normalise: the activation sample is all zeros")
    return float(msn**-0.5)


def layer_normalize(x: torch.Tensor, eps: float = LAYER_NORM_EPS) -> torch.Tensor:
    """Per-vector normalisation to zero mean and unit variance over features. x: [B, d]."""
    x = x.float()
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


# Hand-written: the packages that do it (geom-median 0.1.0 of 2022, hdmedians of 2021) are unmaintained; Weiszfeld is ten lines.
def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances. points: [N, d] -> [d].

    More robust than the mean to the outlier activations that protein language models have.
    """
    points = points.double()
    median = points.mean(dim=0)
    for _ in range(iterations):
        dist = (points - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / dist
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        moved = (updated - median).norm()
        median = updated
        if moved <= tol * median.norm().clamp_min(1.0):
            break
    return median.float()
