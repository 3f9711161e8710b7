"""A study's judging side: the evaluation proteome's baselines and each trained SAE's scores.

Every family is judged on the same proteins, split and controls (:class:`~sae_engine.evaluation.pipeline.Protocol`,
one per concept set). The baselines of a (layer, level) are computed once and cached under
``<out>/evaluation/L<layer>/``: ESM2 neurons of both signs, random directions (as many as the
activation space has dimensions) and random dictionaries of each SAE width, all pooled as the
SAEs of that level are (max over residues, or one value of the mean-pooled vector), and their
unit results per concept set. A point (one trained SAE) adds its own family and its
permuted-label null, and is compared with the neurons at matched counts (random subsets, and
frequency-matched) and with the random dictionary of its own size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from ..atomic import atomic_path
from ..evaluation.concepts import ConceptSet
from ..evaluation.pipeline import Protocol, Settings
from ..evaluation.summary import family_summary, matched_comparison, random_subset_comparison, write_unit_table
from ..evaluation.units import UnitResults

BASELINES = ("neurons", "random_directions", "random_dictionary")


def save_results(path: Path, results: UnitResults) -> None:
    """A UnitResults as one .npz, written atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **{f.name: getattr(results, f.name) for f in dataclasses.fields(UnitResults)})


def load_results(path: Path) -> UnitResults:
    with np.load(path) as z:
        return UnitResults(**{f.name: z[f.name] for f in dataclasses.fields(UnitResults)})


def _save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.save(handle, array)


class Judge:
    """Concept sets, protocols and cached baselines of one study (see the module docstring).

    Args:
        out: the study's evaluation folder.
        store: the evaluation proteome's activation store (every study layer).
        ids, sequences: the evaluation proteins, in the order every matrix here uses.
        concepts: name -> concept set over ``ids``.
        settings: the protocol's settings; draws: random subsets per matched-count comparison.
        dtype: compute dtype of the random dictionaries' projections.
    """

    def __init__(self, out: Path, store: Path, ids: list[str], sequences: list[str], concepts: dict[str, ConceptSet],
                 settings: Settings, draws: int, dtype: torch.dtype, log: Callable[[str], None]) -> None:
        self.out, self.store, self.ids, self.concepts = Path(out), Path(store), ids, concepts
        self.settings, self.draws, self.dtype, self.log = settings, draws, dtype, log
        self.protocols = {name: Protocol(sequences, c.annotations, c.namespace, c.ancestors, settings, c.flat)
                          for name, c in concepts.items()}
        self._means: dict[int, np.ndarray] = {}

    # -- activations on the evaluation proteome ------------------------------------------------

    def _aligned(self, store_ids: list[str], matrix):
        """Rows of a store-ordered matrix in the order of ``self.ids``."""
        if store_ids == self.ids:
            return matrix
        row = {p: i for i, p in enumerate(store_ids)}
        return matrix[[row[p] for p in self.ids]]

    def means(self, layer: int) -> np.ndarray:
        """``[P, d]`` mean-pooled vectors of the evaluation proteins (cached)."""
        if layer not in self._means:
            path = self.out / f"L{layer}" / "means.npy"
            if not path.exists():
                from ..evaluation.features import mean_vectors

                path.parent.mkdir(parents=True, exist_ok=True)
                store_ids, vectors = mean_vectors(self.store, layer)
                _save_array(path, self._aligned(store_ids, vectors))
            self._means[layer] = np.load(path)
        return self._means[layer]

    def sae_activations(self, run_dir: Path, layer: int, level: str):
        """``[P, n_latents]`` sparse per-protein activations of a trained SAE on the evaluation proteome."""
        from ..evaluation.features import protein_activations
        from ..training.trained import load_trained_sae

        sae = load_trained_sae(run_dir)
        n = sae.config.model.n_latents
        if level == "residue":
            acts = protein_activations(self.store, layer, sae.encode, n)
            return self._aligned(acts.ids, acts.max.tocsr())
        means = torch.from_numpy(self.means(layer))
        parts = []
        for lo in range(0, len(means), 4096):
            values, indices = (t.numpy() for t in sae.encode(means[lo:lo + 4096]))
            fired = (values > 0) & (indices >= 0)
            rows = np.broadcast_to(np.arange(values.shape[0])[:, None], values.shape)
            parts.append(sp.csr_matrix((values[fired], (rows[fired], indices[fired])), shape=(values.shape[0], n),
                                       dtype=np.float32))
        return sp.vstack(parts).tocsr()

    def _baseline_activations(self, layer: int, level: str, family: str, n_units: int) -> np.ndarray:
        """``[P, n_units]`` float32 max activations of a baseline family (cached as .npy)."""
        from ..evaluation.features import pool_dense, signed_neurons
        from ..evaluation.nulls import random_dictionary, random_dictionary_on_vectors

        path = self.out / f"L{layer}" / f"{level}-{family}-{n_units}.npy"
        if path.exists():
            return np.load(path)
        d = self.means(layer).shape[1]
        seed = self.settings.seed + 1
        self.log(f"[study] baseline {family} ({n_units} units, {level} level, layer {layer}) on the evaluation proteome")
        if level == "protein":
            vectors = self.means(layer)
            acts = (signed_neurons(torch.from_numpy(vectors)).numpy() if family == "neurons"
                    else random_dictionary_on_vectors(vectors, n_units, seed))
        else:
            transform = signed_neurons if family == "neurons" else random_dictionary(n_units, d, seed, self.dtype)
            store_ids, acts, _ = pool_dense(self.store, layer, transform, n_units, fraction=False)
            acts = self._aligned(store_ids, acts)
        _save_array(path, np.ascontiguousarray(acts, dtype=np.float32))
        return acts

    def baseline(self, layer: int, level: str, family: str, n_units: int, concept: str) -> UnitResults:
        """A baseline family's unit results on one concept set (cached)."""
        path = self.out / f"L{layer}" / concept / f"{level}-{family}-{n_units}.npz"
        if path.exists():
            return load_results(path)
        results = self.protocols[concept].units(self._baseline_activations(layer, level, family, n_units))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_results(path, results)
        return results

    def composition(self, concept: str) -> UnitResults:
        path = self.out / f"composition-{concept}.npz"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_results(path, self.protocols[concept].composition())
        return load_results(path)

    # -- one point ------------------------------------------------------------------------------

    def judge(self, acts, layer: int, level: str, tables: Path) -> dict:
        """Scores of one SAE's ``[P, U]`` activations on every concept set, beside its baselines.

        Returns, per concept set: ``families`` (sae, neurons, random_directions, random_dictionary
        of the SAE's size), ``nulls`` (composition, permuted labels of the SAE), the false-pass
        floor, and the matched-count comparisons with the neurons. Each unit table goes to
        ``tables/<concept>.tsv``.
        """
        n_units = acts.shape[1]
        d = self.means(layer).shape[1]
        out = {}
        tables.mkdir(parents=True, exist_ok=True)
        for name, concept in self.concepts.items():
            protocol = self.protocols[name]
            sae = protocol.units(acts)
            write_unit_table(tables / f"{name}.tsv", sae, concept)
            neurons = self.baseline(layer, level, "neurons", 2 * d, name)
            families = {"sae": sae, "neurons": neurons,
                        "random_directions": self.baseline(layer, level, "random_directions", d, name),
                        "random_dictionary": self.baseline(layer, level, "random_dictionary", n_units, name)}
            nulls = {"composition": self.composition(name), "permuted_labels": protocol.permuted_labels(acts, 0)}
            summaries = {key: family_summary(r, concept) for key, r in families.items()}
            null_summaries = {key: family_summary(r, concept) for key, r in nulls.items()}
            out[name] = {
                "families": summaries,
                "nulls": null_summaries,
                "false_pass_floor": max(s["pass_share"] for s in null_summaries.values()),
                "vs_neurons_random_subsets": random_subset_comparison(sae, neurons, self.draws, self.settings.seed),
                "vs_neurons_frequency_matched": matched_comparison(sae, neurons),
            }
        return out
