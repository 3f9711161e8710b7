"""Per-protein feature activations: what GO enrichment and feature reports read.

From the vectors in an activation store (residue-level, or pooled per protein for protein-level
SAEs) and a sparse code per vector (a trained SAE's, or
the ReLU'd ESM2 neurons as the baseline every claim is compared with), build two sparse
``[proteins, features]`` matrices: the maximum activation over each protein's residues, and the
fraction of its residues on which the feature fires. A protein cut into overlapping windows
counts the overlap twice in the fraction (the maximum is unaffected).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

_NPZ_KEYS = ("ids", "shape", "max_data", "max_indices", "max_indptr", "frac_data", "frac_indices", "frac_indptr")
Code = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # [r, d] -> values, indices [r, k]


@dataclass
class ProteinActivations:
    """ids: P protein ids in store order; max, frac: [P, F] float32 CSR (zeros not stored)."""

    ids: list[str]
    max: sp.csr_matrix
    frac: sp.csr_matrix

    def save(self, path: str | Path) -> None:
        """One .npz with ids, and both matrices in CSR parts."""
        np.savez_compressed(
            path, ids=np.array(self.ids), shape=np.array(self.max.shape),
            max_data=self.max.data, max_indices=self.max.indices, max_indptr=self.max.indptr,
            frac_data=self.frac.data, frac_indices=self.frac.indices, frac_indptr=self.frac.indptr,
        )

    @classmethod
    def load(cls, path: str | Path) -> ProteinActivations:
        """Read a file written by :meth:`save`; anything else raises ValueError naming the file."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read as a ProteinActivations .npz: {error}") from error
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError(f"{path}: a single array, not a ProteinActivations .npz (written by `sae-engine features`)")
        with z:
            missing = sorted(set(_NPZ_KEYS) - set(z.files))
            if missing:
                raise ValueError(f"{path}: not a ProteinActivations .npz (written by `sae-engine features`): "
                                 f"missing {', '.join(missing)}")
            try:
                shape = tuple(int(v) for v in z["shape"])
                ids = [str(i) for i in z["ids"]]
                matrix = {name: sp.csr_matrix((z[f"{name}_data"], z[f"{name}_indices"], z[f"{name}_indptr"]), shape=shape)
                          for name in ("max", "frac")}
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}: malformed ProteinActivations .npz: {error}") from error
        if len(ids) != shape[0]:
            raise ValueError(f"{path}: {len(ids)} ids for {shape[0]} rows")
        return cls(ids, matrix["max"], matrix["frac"])


def neuron_code(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ESM2-neuron baseline as a code: every dimension, ReLU'd. x: [r, d] -> [r, d] twice."""
    return x.float().clamp_min(0), torch.arange(x.shape[1]).expand(x.shape[0], -1)


def protein_activations(
    store_dir: str | Path, layer: int, code: Code, n_features: int, batch_rows: int = 8192
) -> ProteinActivations:
    """Pool a sparse code over each protein's rows in a store.

    code maps vectors [r, d] to (values, indices) [r, k] (index -1 = empty slot). In a
    residue-level store the rows are residues; in a pooled store (a protein-level SAE) they are
    one vector per window, so ``max`` is the protein's own activation and ``frac`` the share of
    its windows where the feature fires.
    """
    from ..esm.extract import ActivationStore

    store = ActivationStore(store_dir)
    windows_of: dict[str, list[dict]] = {}
    for window in store.index():
        windows_of.setdefault(window["shard"], []).append(window)
    ids: list[str] = []
    protein_of: dict[str, int] = {}
    keys, values, counts, rows_per_protein = [], [], [], np.zeros(0, dtype=np.int64)
    for shard_path, shard in zip(store.shard_paths(layer), store.manifest["shards"]):
        array = np.load(shard_path, mmap_mode="r")
        owner = np.empty(shard["rows"], dtype=np.int64)
        for window in windows_of.get(shard["name"], []):
            protein = protein_of.setdefault(window["id"], len(ids))
            if protein == len(ids):
                ids.append(window["id"])
            owner[window["offset"] : window["offset"] + window["rows"]] = protein
        rows_per_protein = np.pad(rows_per_protein, (0, len(ids) - len(rows_per_protein)))
        np.add.at(rows_per_protein, owner, 1)
        for lo in range(0, shard["rows"], batch_rows):
            batch = torch.from_numpy(np.array(array[lo : lo + batch_rows], dtype=np.float32))
            v, i = (t.cpu().numpy() for t in code(batch))
            fired = (v > 0) & (i >= 0)
            rows = np.broadcast_to(owner[lo : lo + len(batch), None], i.shape)
            # reduce each batch to one entry per (protein, feature) at once: the entries kept are
            # about P x (distinct features per protein), not residues x k
            key, value, count = _reduce_pairs(rows[fired] * n_features + i[fired], v[fired].astype(np.float32),
                                              np.ones(int(fired.sum()), dtype=np.int64))
            keys.append(key), values.append(value), counts.append(count)
    key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    value = np.concatenate(values) if values else np.zeros(0, np.float32)
    count = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    unique, maxima, count = _reduce_pairs(key, value, count)  # proteins that straddle batches
    protein, feature = unique // n_features, unique % n_features
    shape = (len(ids), n_features)
    frac = count / rows_per_protein[protein]
    return ProteinActivations(
        ids,
        sp.csr_matrix((maxima, (protein, feature)), shape=shape, dtype=np.float32),
        sp.csr_matrix((frac.astype(np.float32), (protein, feature)), shape=shape, dtype=np.float32),
    )


def _reduce_pairs(key: np.ndarray, value: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries ``[m]`` with repeated keys -> sorted unique keys, the max value and the summed count of each."""
    if not key.size:
        return key, value, count
    order = np.argsort(key, kind="stable")
    key, value, count = key[order], value[order], count[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return key[starts], np.maximum.reduceat(value, starts), np.add.reduceat(count, starts)


def _windows(store_dir: str | Path, layer: int, batch_rows: int):
    """Protein ids in store order, and batches of whole windows: (protein of each window ``[w]``,
    window starts inside the batch ``[w]``, the batch's rows ``[r, d]`` float32)."""
    from ..esm.extract import ActivationStore

    store = ActivationStore(store_dir)
    by_shard: dict[str, list[dict]] = {}
    ids: list[str] = []
    protein_of: dict[str, int] = {}
    for window in store.index():
        by_shard.setdefault(window["shard"], []).append(window)
        if window["id"] not in protein_of:
            protein_of[window["id"]] = len(ids)
            ids.append(window["id"])

    def batches():
        for shard_path, shard in zip(store.shard_paths(layer), store.manifest["shards"]):
            array = np.load(shard_path, mmap_mode="r")
            windows = sorted(by_shard.get(shard["name"], []), key=lambda w: w["offset"])
            group: list[dict] = []
            for window in [*windows, None]:
                rows = sum(w["rows"] for w in group)
                if group and (window is None or rows + window["rows"] > batch_rows):
                    lo = group[0]["offset"]
                    starts = np.array([w["offset"] - lo for w in group])
                    yield (np.array([protein_of[w["id"]] for w in group]), starts,
                           np.array(array[lo : lo + rows], dtype=np.float32))
                    group = []
                if window is not None:
                    group.append(window)

    return ids, batches()


def pool_dense(store_dir: str | Path, layer: int, transform: Callable[[torch.Tensor], torch.Tensor],
               n_units: int, batch_rows: int = 8192, fraction: bool = True
               ) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Per-protein max and firing fraction of a dense per-vector transform, as dense arrays.

    transform maps vectors ``[r, d]`` to activations ``[r, n_units]``, ReLU'd (<= 0 is "off",
    so 0 is where every maximum starts). Returns (protein ids in store order, max ``[P, n_units]``
    float32, fraction ``[P, n_units]`` float32 or None when ``fraction`` is False).

    Each batch of whole windows is reduced window by window over its contiguous rows (``amax``
    and a count of positives on a ``[rows, n_units]`` slice that stays in cache), then added to
    its protein's row; a protein cut into several windows gets the max and the sum over them.
    No per-element scatter and no ``[r, n_units]`` temporaries beyond the transform's own
    output. Measured on a 2-core Zen 4 (4,096 random directions, 845k residues): 1.5x the time of
    the transform's GEMM with the fraction, 1.3x for the max alone (``fraction=False``, what the
    evaluation reads); the scatter-based pooling before took 2.5x.
    """
    ids, batches = _windows(store_dir, layer, batch_rows)
    maxima = torch.zeros(len(ids), n_units)
    fired = torch.zeros(len(ids), n_units) if fraction else None
    rows = np.zeros(len(ids), dtype=np.float64)
    ones = torch.ones(0)
    for protein, starts, x in batches:
        y = transform(torch.from_numpy(x))
        ends = np.r_[starts[1:], len(x)]
        window_max = torch.empty(len(starts), n_units, dtype=y.dtype)
        window_fired = torch.empty(len(starts), n_units) if fraction else None
        if fraction and len(ones) < len(x):
            ones = torch.ones(len(x))
        for w, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist())):
            part = y[lo:hi]
            torch.amax(part, dim=0, out=window_max[w])
            if window_fired is None:
                continue
            if part.dtype == torch.float32:  # ReLU'd, so sign() is 0 or 1: a vector-matrix product counts in cache
                torch.mv(torch.sign(part).T, ones[: hi - lo], out=window_fired[w])
            else:  # bf16 sums would round counts above 256
                window_fired[w] = (part > 0).sum(dim=0)
        index = torch.from_numpy(protein)
        if np.unique(protein).size == protein.size:  # the common case: each protein once in the batch
            maxima[index] = torch.maximum(maxima[index], window_max.float())
        else:  # a protein cut into several windows: reduce, never overwrite (maxima start at 0)
            maxima.scatter_reduce_(0, index[:, None].expand(-1, n_units), window_max.float(), "amax")
        if fired is not None:
            fired.index_add_(0, index, window_fired)
        np.add.at(rows, protein, ends - starts)
    frac = (fired / torch.from_numpy(np.maximum(rows, 1)).float()[:, None]).numpy() if fired is not None else None
    return ids, maxima.numpy(), frac


def pooled_dense(store_dir: str | Path, layer: int, transform: Callable[[torch.Tensor], torch.Tensor],
                 n_units: int, batch_rows: int = 8192) -> ProteinActivations:
    """Per-protein max and firing fraction of a dense per-vector transform (ESM2 neurons, random
    directions): the pooling of :func:`protein_activations` without listing every (row, unit) pair.

    transform maps vectors ``[r, d]`` to activations ``[r, n_units]`` (ReLU'd: <= 0 is "off").
    See :func:`pool_dense`, which this stores sparse.
    """
    ids, maxima, frac = pool_dense(store_dir, layer, transform, n_units, batch_rows)
    return ProteinActivations(ids, sp.csr_matrix(maxima), sp.csr_matrix(frac))


def mean_vectors(store_dir: str | Path, layer: int, batch_rows: int = 8192) -> tuple[list[str], np.ndarray]:
    """Protein ids and their mean-pooled vectors ``[P, d]`` from a residue-level store (what an
    extraction with ``pool="mean"`` would give, without running the model again)."""
    ids, batches = _windows(store_dir, layer, batch_rows)
    sums, rows = None, np.zeros(len(ids))
    for protein, starts, x in batches:
        if sums is None:
            sums = np.zeros((len(ids), x.shape[1]))
        np.add.at(sums, protein, np.add.reduceat(x.astype(np.float64), starts, axis=0))
        np.add.at(rows, protein, np.diff(np.r_[starts, len(x)]))
    if sums is None:
        raise ValueError(f"{store_dir}: the store holds no vectors")
    return ids, (sums / rows[:, None]).astype(np.float32)


def signed_neurons(x: torch.Tensor) -> torch.Tensor:
    """ESM2 neurons of both signs: ``[r, d] -> [r, 2d]``, ReLU(x) then ReLU(-x)."""
    x = x.float()
    return torch.cat([x.clamp_min(0), (-x).clamp_min(0)], dim=1)


def topk_code(transform: Callable[[torch.Tensor], torch.Tensor], k: int) -> Code:
    """A dense transform sparsified to its ``k`` largest activations per vector, as a Code."""
    def code(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values, indices = transform(x).topk(k, dim=1)
        return values, indices

    return code


def load_sae_code(run_dir: str | Path) -> tuple[Code, int]:
    """The encoder of a trained run's latest checkpoint as a Code, and its number of features."""
    from ..training.trained import load_trained_sae

    sae = load_trained_sae(run_dir)
    return sae.encode, sae.config.model.n_latents


def write_study_tsv(activations: ProteinActivations, path: str | Path, prefix: str = "f",
                    threshold: float = 0.0, top_n: int | None = 200) -> int:
    """Study sets (see ``sae_engine.go.enrich.study_sets``) as ``feature<TAB>accession`` lines,
    the input of ``sae-engine enrich``. Returns the number of lines."""
    from ..go.enrich import study_sets

    sets = study_sets(activations.max, threshold=threshold, top_n=top_n).tocoo()
    lines = [f"{prefix}{f}\t{activations.ids[p]}\n" for f, p in zip(sets.row, sets.col)]
    Path(path).write_text("".join(lines))
    return len(lines)


def _run(args) -> int:
    import sys

    try:
        code, n_features = neuron_code, None
        if args.run_dir:
            code, n_features = load_sae_code(args.run_dir)
        else:
            from ..esm.extract import ActivationStore

            n_features = ActivationStore(args.store).manifest["settings"]["d"]
        activations = protein_activations(args.store, args.layer, code, n_features)
    except (FileNotFoundError, ValueError) as error:
        print(f"sae-engine features: error: {error}", file=sys.stderr)
        return 2
    activations.save(args.out)
    summary = f"{len(activations.ids)} proteins x {n_features} features ({activations.max.nnz} nonzero) -> {args.out}"
    if args.study:
        summary += f"; {write_study_tsv(activations, args.study, 'f' if args.run_dir else 'neuron', top_n=args.top_n)} study lines -> {args.study}"
    print(summary)
    return 0


def register(commands) -> None:
    """Add ``sae-engine features``."""
    parser = commands.add_parser("features", help="per-protein feature activations (SAE or ESM2 neurons)")
    parser.add_argument("--store", required=True, help="residue-level activation store")
    parser.add_argument("--layer", type=int, required=True, help="layer of the store the SAE was trained on")
    parser.add_argument("--run", dest="run_dir", help="training run folder (its latest checkpoint); absent: ESM2 neurons")
    parser.add_argument("--out", required=True, help=".npz with ids and the max / fraction matrices")
    parser.add_argument("--study", help="also write study sets as feature<TAB>accession (input of enrich)")
    parser.add_argument("--top-n", type=int, default=200, help="study set cap per feature (default 200)")
    parser.set_defaults(run=_run)
