"""Data-dependent initialisation: normalisation scale and the decoder bias."""
from __future__ import annotations

import torch


def mean_squared_norm_scale(sample: torch.Tensor) -> float:
    """Scale that brings a sample's mean squared norm to 1. sample: [N, d]."""
    msn = sample.double().pow(2).sum(dim=1).mean().item()
    if not msn > 0:
        raise ValueError("cannot normalise: the activation sample is all zeros")
    return float(msn**-0.5)


def layer_normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
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
