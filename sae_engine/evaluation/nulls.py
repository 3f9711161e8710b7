"""Null families, evaluated by the same code as the real ones.

Composition units and permuted labels cannot know biology beyond what the controls remove: their
pass share is the false-pass floor. Random directions are the baseline of a random dictionary:
they know what the activation space knows (in ESM2's, protein families such as kinases).

- Random directions: ReLU'd projections on random unit vectors of the ESM2 activations, pooled
  per protein exactly like the neurons (needs the activation store).
- Composition units: ReLU'd random combinations of log length and the 20 amino-acid fractions,
  each cut at a random quantile so that, like sparse features, each fires on 2-50 % of proteins.
- Permuted labels: a family's own units, with the proteins' GO labels permuted within length
  deciles (:func:`.controls.permutation_within_deciles`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def composition_units(covariates: np.ndarray, n_units: int, seed: int) -> np.ndarray:
    """``[P, n_units]`` float64 composition units from ``[P, C]`` covariates (see the module docstring)."""
    rng = np.random.default_rng(seed)
    scale = covariates.std(axis=0)
    z = (covariates - covariates.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    projection = z @ rng.standard_normal((z.shape[1], n_units))  # [P, n]
    quantile = rng.uniform(0.5, 0.98, n_units)
    cut = np.sort(projection, axis=0)[(quantile * (z.shape[0] - 1)).astype(np.int64), np.arange(n_units)]
    return np.maximum(projection - cut, 0.0)


def random_unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """``[n, d]`` float64 rows drawn uniformly on the unit sphere."""
    w = np.random.default_rng(seed).standard_normal((n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def random_directions_in_store(store_dir: str | Path, layer: int, seed: int):
    """``ProteinActivations`` of ``d`` random directions of a store's layer, ReLU'd and pooled
    like the neurons (``sae_engine.evaluation.features.pooled_dense``)."""
    from ..esm.extract import ActivationStore
    from .features import pooled_dense

    d = int(ActivationStore(store_dir).manifest["settings"]["d"])
    directions = torch.from_numpy(random_unit_vectors(d, d, seed).astype(np.float32))  # [d, d]
    return pooled_dense(store_dir, layer, lambda x: (x.float() @ directions.T).clamp_min(0), d)
