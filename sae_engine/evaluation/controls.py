"""What every unit is controlled for: a length-stratified split, and length and composition.

A unit that only tracks protein length or amino-acid composition must not pass for biology, so
each unit's activation is residualized on log length and the 20 amino-acid fractions before
anything is chosen. The least-squares fit uses discovery proteins only and is then applied
unchanged to held-out proteins.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
N_DECILES = 10


def length_deciles(lengths: np.ndarray) -> np.ndarray:
    """``[P]`` int decile (0..9) of each protein's length, by rank (ties by position)."""
    lengths = np.asarray(lengths)
    rank = np.empty(lengths.size, dtype=np.int64)
    rank[np.argsort(lengths, kind="stable")] = np.arange(lengths.size)
    return rank * N_DECILES // max(lengths.size, 1)


def stratified_split(lengths: np.ndarray, seed: int) -> np.ndarray:
    """``[P]`` bool, True for discovery: a seeded half of every length decile (the other half is held out).

    Inside each decile the proteins are put in a seeded random order and alternate between the
    halves (even deciles start with discovery, odd ones with held out), so the halves differ by at
    most one protein per decile and at most one overall.
    """
    decile = length_deciles(lengths)
    order = np.lexsort((np.random.default_rng(seed).random(decile.size), decile))
    start = np.searchsorted(decile[order], decile[order], side="left")
    discovery = np.empty(decile.size, dtype=bool)
    discovery[order] = (np.arange(decile.size) - start + decile[order]) % 2 == 0  # odd deciles start held out
    return discovery


def permutation_within_deciles(lengths: np.ndarray, seed: int) -> np.ndarray:
    """``[P]`` int: a seeded permutation that maps every protein to one of the same length decile."""
    decile = length_deciles(lengths)
    grouped = np.argsort(decile, kind="stable")
    shuffled = np.lexsort((np.random.default_rng(seed).random(decile.size), decile))
    source = np.empty(decile.size, dtype=np.int64)
    source[grouped] = shuffled
    return source


def covariates(sequences: Sequence[str]) -> np.ndarray:
    """``[P, 21]`` float64: log length, then the fraction of each of the 20 standard amino acids."""
    lookup = np.full(256, -1, dtype=np.int64)
    lookup[np.frombuffer(AMINO_ACIDS.encode(), dtype=np.uint8)] = np.arange(len(AMINO_ACIDS))
    out = np.zeros((len(sequences), 1 + len(AMINO_ACIDS)))
    for row, sequence in enumerate(sequences):
        codes = lookup[np.frombuffer(sequence.encode(), dtype=np.uint8)]
        out[row, 0] = np.log(max(len(sequence), 1))
        out[row, 1:] = np.bincount(codes[codes >= 0], minlength=len(AMINO_ACIDS)) / max(len(sequence), 1)
    return out


class Residualizer:
    """Least squares on ``[1, covariates]`` fitted on the discovery rows, applied to all rows.

    The fit is the pseudo-inverse of the standardized discovery design (the 20 fractions sum to
    one, so the design is rank-deficient: the minimum-norm solution gives the same residuals).
    """

    def __init__(self, covariates: np.ndarray, discovery: np.ndarray) -> None:
        """covariates: ``[P, C]``; discovery: ``[P]`` bool."""
        fit_rows = covariates[discovery]
        mean, scale = fit_rows.mean(axis=0), fit_rows.std(axis=0)
        scale[scale == 0] = 1.0
        self.design = np.hstack([np.ones((covariates.shape[0], 1)), (covariates - mean) / scale])  # [P, 1 + C]
        self.discovery = np.asarray(discovery, dtype=bool)
        self.pinv = np.linalg.pinv(self.design[self.discovery])  # [1 + C, P_d]

    def __call__(self, activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """activations ``[P, U]`` -> (residuals ``[P, U]``, R² ``[U]`` on discovery; NaN for constant units)."""
        beta = self.pinv @ activations[self.discovery]  # [1 + C, U]
        residual = activations - self.design @ beta
        fitted = residual[self.discovery]
        total = ((activations[self.discovery] - activations[self.discovery].mean(axis=0)) ** 2).sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(total > 0, 1.0 - (fitted ** 2).sum(axis=0) / total, np.nan)
        return residual, r2
