"""Null families, evaluated by the same code as the real ones.

Composition units and permuted labels cannot know biology beyond what the controls remove: their
pass share is the false-pass floor. Random directions are the baseline of a random dictionary:
they know what the activation space knows (in ESM2's, protein families such as kinases).

- Random directions: ReLU'd projections on random unit vectors of the ESM2 activations, pooled
  per protein exactly like the neurons (needs the activation store).
- Random dictionaries: the same, with as many directions as the family they are compared with
  (4,096 for a 4,096-latent SAE), pooled as that family is (max over residues for a
  residue-level family, one projection of the mean vector for a protein-level one): the
  baseline for distinct concepts, which grows with a family's size.
- Composition units: ReLU'd random combinations of log length and the 20 amino-acid fractions,
  each cut at a random quantile so that, like sparse features, each fires on 2-50 % of proteins.
- Permuted labels: a family's own units, with the proteins' GO labels permuted within length
  deciles (:func:`.controls.permutation_within_deciles`).
"""
from __future__ import annotations

from collections.abc import Callable
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


def random_dictionary(n_units: int, d: int, seed: int, dtype: torch.dtype = torch.float32
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The transform of a random dictionary: ``[r, d]`` vectors -> ``[r, n_units]`` ReLU'd projections
    on ``n_units`` random unit directions (computed in ``dtype``: bf16 where the CPU has bf16 units)."""
    directions = torch.from_numpy(random_unit_vectors(n_units, d, seed).astype(np.float32)).to(dtype)  # [n, d]

    def transform(x: torch.Tensor) -> torch.Tensor:
        return (x.to(dtype) @ directions.T).clamp_min_(0)

    return transform


def random_dictionary_in_store(store_dir: str | Path, layer: int, n_units: int, seed: int,
                               dtype: torch.dtype = torch.float32) -> tuple[list[str], np.ndarray]:
    """Protein ids and ``[P, n_units]`` float32 per-protein max of a random dictionary over each
    protein's residues in a store (pooled like a residue-level SAE's units)."""
    from ..esm.extract import ActivationStore
    from .features import pool_dense

    d = int(ActivationStore(store_dir).manifest["settings"]["d"])
    ids, maxima, _ = pool_dense(store_dir, layer, random_dictionary(n_units, d, seed, dtype), n_units, fraction=False)
    return ids, maxima


def random_dictionary_on_vectors(vectors: np.ndarray, n_units: int, seed: int) -> np.ndarray:
    """``[P, n_units]`` float32 activations of a random dictionary on per-protein vectors ``[P, d]``
    (pooled like a protein-level SAE on mean-pooled vectors)."""
    transform = random_dictionary(n_units, vectors.shape[1], seed)
    return np.concatenate([transform(torch.from_numpy(np.ascontiguousarray(vectors[lo:lo + 8192], dtype=np.float32))).numpy()
                           for lo in range(0, len(vectors), 8192)]) if len(vectors) else np.zeros((0, n_units), np.float32)


def random_directions_in_store(store_dir: str | Path, layer: int, seed: int):
    """``ProteinActivations`` of ``d`` random directions of a store's layer, ReLU'd and pooled
    like the neurons (``sae_engine.evaluation.features.pooled_dense``)."""
    from ..esm.extract import ActivationStore
    from .features import pooled_dense

    d = int(ActivationStore(store_dir).manifest["settings"]["d"])
    directions = torch.from_numpy(random_unit_vectors(d, d, seed).astype(np.float32))  # [d, d]
    return pooled_dense(store_dir, layer, lambda x: (x.float() @ directions.T).clamp_min(0), d)
