"""Reading and checking what ``sae-engine evaluate`` is given; every problem is one clear error."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp


class EvaluationInputError(ValueError):
    """Bad input to the evaluation; the message names the file or value."""


@dataclass
class GoLabels:
    """The ontology and the ``[P, T]`` propagated annotations of the evaluated proteins."""

    ontology: object  # sae_engine.go.ontology.Ontology
    annotations: sp.csr_matrix
    ancestors: sp.csr_matrix
    warnings: list[str]


def parse_unit_spec(spec: str) -> tuple[str, Path]:
    """``NAME=PATH`` -> (name, path)."""
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not name or not path.strip():
        raise EvaluationInputError(f"--units {spec!r}: expected NAME=PATH, e.g. sae=runs/demo/sae_activations.npz")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise EvaluationInputError(f"--units {spec!r}: family names use letters, digits, '-', '_' and '.'")
    return name, Path(path.strip())


def load_families(specs: Sequence[str]) -> tuple[list[str], dict[str, sp.csr_matrix]]:
    """Protein ids (the first family's order) and each family's ``[P, U]`` max activations, rows
    aligned to those ids. Every family must hold units and exactly the same proteins."""
    from .features import ProteinActivations

    if not specs:
        raise EvaluationInputError("no --units given")
    families: dict[str, sp.csr_matrix] = {}
    ids: list[str] | None = None
    first = ""
    for spec in specs:
        name, path = parse_unit_spec(spec)
        if name in families:
            raise EvaluationInputError(f"--units: family {name!r} given twice")
        if not path.exists():
            raise EvaluationInputError(f"--units {name}: {path} does not exist")
        try:
            acts = ProteinActivations.load(path)
        except ValueError as error:
            raise EvaluationInputError(str(error)) from error
        if acts.max.shape[0] == 0 or acts.max.shape[1] == 0:
            raise EvaluationInputError(f"{path}: family {name!r} is empty ({acts.max.shape[0]} proteins x "
                                       f"{acts.max.shape[1]} units)")
        if len(set(acts.ids)) != len(acts.ids):
            repeated = next(i for i in acts.ids if acts.ids.count(i) > 1)
            raise EvaluationInputError(f"{path}: protein {repeated!r} appears more than once")
        if ids is None:
            ids, first, families[name] = acts.ids, name, acts.max.tocsr()
            continue
        if set(acts.ids) != set(ids):
            only_here = sorted(set(acts.ids) - set(ids))[:3]
            only_there = sorted(set(ids) - set(acts.ids))[:3]
            raise EvaluationInputError(
                f"{path}: family {name!r} covers other proteins than {first!r} ({len(acts.ids)} against "
                f"{len(ids)}; only in {name}: {only_here}, only in {first}: {only_there}); every family must "
                "hold the same proteins")
        row = {protein: i for i, protein in enumerate(acts.ids)}
        families[name] = acts.max.tocsr()[[row[p] for p in ids]]
    return ids, families


def load_sequences(fastas: Iterable[Path], ids: Sequence[str]) -> list[str]:
    """The sequences of ``ids`` from the first FASTA file that holds each; missing ids are an error."""
    from ..esm.fasta import FastaError, read_fasta

    wanted = set(ids)
    found: dict[str, str] = {}
    names = []
    for fasta in fastas:
        names.append(str(fasta))
        if not Path(fasta).exists():
            continue
        try:
            for record in read_fasta(fasta):
                if record.id in wanted and record.id not in found:
                    found[record.id] = record.sequence
        except FastaError as error:
            raise EvaluationInputError(str(error)) from error
        if len(found) == len(wanted):
            break
    missing = [p for p in ids if p not in found]
    if missing:
        raise EvaluationInputError(f"{len(missing)} of {len(ids)} proteins have no sequence in {' or '.join(names)} "
                                   f"(first: {missing[:5]})")
    return [found[p] for p in ids]


def load_labels(annotations: Path, ontology_path: Path, ids: Sequence[str], relations=("is_a",)) -> GoLabels:
    """Read the ontology and annotations; proteins without any GO annotation are an error."""
    from .concepts import ConceptError, read_go

    try:
        ontology, matrix, warnings = read_go(annotations, ontology_path, ids, relations)
    except ConceptError as error:
        raise EvaluationInputError(str(error)) from error
    bare = np.flatnonzero(matrix.getnnz(axis=1) == 0)
    if bare.size:
        raise EvaluationInputError(f"{bare.size} of {len(ids)} proteins have no GO annotation in {annotations} "
                                   f"(first: {[ids[i] for i in bare[:5]]}); evaluate annotated proteins only")
    return GoLabels(ontology, matrix.tocsr(), ontology.ancestor_matrix(relations), warnings)


def load_random_directions(store: Path, layer: int, ids: Sequence[str], seed: int) -> sp.csr_matrix:
    """Random directions of the store's layer (``nulls.random_directions_in_store``), rows aligned to ``ids``."""
    from .nulls import random_directions_in_store

    try:
        acts = random_directions_in_store(store, layer, seed)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise EvaluationInputError(f"--store {store} --layer {layer}: {error}") from error
    row = {protein: i for i, protein in enumerate(acts.ids)}
    missing = [p for p in ids if p not in row]
    if missing:
        raise EvaluationInputError(f"--store {store}: {len(missing)} of the evaluated proteins are not in the store "
                                   f"(first: {missing[:5]})")
    return acts.max.tocsr()[[row[p] for p in ids]]


def load_random_dictionaries(store: Path, layer: int, ids: Sequence[str], sizes: dict[str, int], seed: int
                             ) -> dict[str, np.ndarray]:
    """Per family, ``[P, units]`` max activations of a random dictionary of its size in the store's
    space (:func:`.nulls.random_dictionary_in_store`), rows aligned to ``ids``; one per distinct size."""
    from .nulls import random_dictionary_in_store

    drawn: dict[int, np.ndarray] = {}
    for size in sorted(set(sizes.values())):
        try:
            store_ids, maxima = random_dictionary_in_store(store, layer, size, seed)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise EvaluationInputError(f"--store {store} --layer {layer}: {error}") from error
        row = {protein: i for i, protein in enumerate(store_ids)}
        missing = [p for p in ids if p not in row]
        if missing:
            raise EvaluationInputError(f"--store {store}: {len(missing)} of the evaluated proteins are not in the "
                                       f"store (first: {missing[:5]})")
        drawn[size] = maxima[[row[p] for p in ids]]
    return {name: drawn[size] for name, size in sizes.items()}
