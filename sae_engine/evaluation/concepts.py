"""Concept sets: what a unit may capture, as one ``[proteins, concepts]`` label matrix.

Two kinds go through the same protocol (:mod:`.units`):

- an ontology (GO): annotations propagated up the ontology, one background per namespace
  (BP, MF, CC), the most specific significant terms flagged through the ancestor closure;
- a flat table (Pfam families, or any ``accession<TAB>label`` table): no hierarchy (the
  ancestor closure is the identity), one namespace, and the background is every evaluated
  protein: one without a label in the table has none of its concepts (a protein without a Pfam
  family is a true negative for every family; GO's per-namespace backgrounds exist because an
  unannotated namespace means "not studied").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FLAT_NAMESPACE = "labels"


class ConceptError(ValueError):
    """A concept table that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class ConceptSet:
    """Labels of the evaluated proteins.

    Attributes:
        name: what the set is ("go", "pfam", a file stem), used in file and column names.
        ids, names: ``[T]`` concept ids and readable names.
        namespace: ``[T]`` int index into ``namespaces``.
        namespaces: namespace names (GO's BP, MF, CC; a flat table has one).
        annotations: ``[P, T]`` bool CSR, rows in the order of the evaluated proteins.
        ancestors: ``[T, T]`` bool reflexive ancestor closure (the identity for a flat table).
        flat: True for a table without an ontology.
        warnings: what was dropped or mapped on reading, one line per kind.
    """

    name: str
    ids: list[str]
    names: list[str]
    namespace: np.ndarray
    namespaces: tuple[str, ...]
    annotations: sp.csr_matrix
    ancestors: sp.csr_matrix
    flat: bool
    warnings: tuple[str, ...] = ()

    @property
    def labelled(self) -> np.ndarray:
        """``[P]`` bool: the protein carries at least one concept."""
        return self.annotations.getnnz(axis=1) > 0


def read_flat_table(path: str | Path) -> list[tuple[str, str, str]]:
    """``(accession, label, name)`` rows of a tab-separated table: accession, label, optional name.

    Blank lines and ``#`` comments are skipped, and a first line whose first column is
    ``accession`` is a header (as in the prepared ``human_pfam.tsv``). A line without a label is
    an error naming the file and line.
    """
    path = Path(path)
    rows: list[tuple[str, str, str]] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise ConceptError(f"{path}: cannot read: {error.strerror}") from error
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if not line.strip() or line.startswith("#"):
                    continue
                cells = [cell.strip() for cell in line.split("\t")]
                if number == 1 and cells[0].lower() == "accession":
                    continue
                if len(cells) < 2 or not cells[0] or not cells[1]:
                    raise ConceptError(f"{path}:{number}: expected accession<TAB>label[<TAB>name], got {line[:80]!r}")
                rows.append((cells[0], cells[1], cells[2] if len(cells) > 2 else cells[1]))
        except UnicodeDecodeError as error:
            raise ConceptError(f"{path}: not UTF-8 text ({error.reason})") from error
    if not rows:
        raise ConceptError(f"{path}: no accession<TAB>label rows")
    return rows


def flat_concepts(path: str | Path, ids: Sequence[str], name: str | None = None) -> ConceptSet:
    """A flat concept set from a protein-to-label table, rows aligned to ``ids``.

    Proteins of the table outside ``ids`` are ignored (counted in ``warnings``); proteins of
    ``ids`` without a label are kept, outside the background. No labelled protein is an error.
    """
    rows = read_flat_table(path)
    row_of = {protein: i for i, protein in enumerate(ids)}
    labels: dict[str, int] = {}
    names: list[str] = []
    pairs: set[tuple[int, int]] = set()
    outside: set[str] = set()
    for accession, label, label_name in rows:
        if accession not in row_of:
            outside.add(accession)
            continue
        if label not in labels:
            labels[label] = len(labels)
            names.append(label_name)
        pairs.add((row_of[accession], labels[label]))
    if not pairs:
        raise ConceptError(f"{path}: none of the {len(ids)} evaluated proteins has a label in it "
                           f"(first accessions there: {[r[0] for r in rows[:3]]})")
    r, c = (np.array(v, dtype=np.int64) for v in zip(*sorted(pairs)))
    matrix = sp.csr_matrix((np.ones(r.size, dtype=bool), (r, c)), shape=(len(ids), len(labels)))
    warnings = (f"proteins of {path} outside the evaluated ones ignored: {len(outside)}",) if outside else ()
    n = len(labels)
    return ConceptSet(name or Path(path).stem, list(labels), names, np.zeros(n, dtype=np.int8), (FLAT_NAMESPACE,),
                      matrix, sp.identity(n, dtype=bool, format="csr"), True, warnings)


def read_go(annotations: str | Path, ontology_path: str | Path, ids: Sequence[str], relations=("is_a",)):
    """The ontology, the propagated annotation matrix [len(ids), terms] (rows aligned to ``ids``)
    and the reader's warnings; ConceptError naming a missing or unreadable file."""
    from ..go.annotations import AnnotationError, CountedWarnings, annotation_matrix, read_annotations
    from ..go.ontology import OntologyError, load_ontology

    for path, what in ((annotations, "annotations"), (ontology_path, "ontology")):
        if not Path(path).exists():
            raise ConceptError(f"{what} file {path} does not exist")
    warnings = CountedWarnings()
    try:
        ontology = load_ontology(ontology_path)
        matrix = annotation_matrix(read_annotations(annotations, ontology, warnings), ontology, list(ids),
                                   relations).matrix
    except (OntologyError, AnnotationError) as error:
        raise ConceptError(str(error)) from error
    return ontology, matrix, warnings.messages()


def go_concepts(annotations: str | Path, ontology_path: str | Path, ids: Sequence[str], relations=("is_a",),
                name: str = "go") -> ConceptSet:
    """GO annotations propagated over the ontology (OBO or GO.sqlite), rows aligned to ``ids``.

    Proteins without any annotation are kept (they are outside every background); callers that
    want only annotated proteins filter on :attr:`ConceptSet.labelled`.
    """
    from ..go.ontology import NAMESPACES

    ontology, matrix, warnings = read_go(annotations, ontology_path, ids, relations)
    return ConceptSet(name, list(ontology.ids), list(ontology.names), np.asarray(ontology.namespace), NAMESPACES,
                      matrix.tocsr(), ontology.ancestor_matrix(relations).tocsr(), False, tuple(warnings))


def from_go_labels(labels, name: str = "go") -> ConceptSet:
    """A ConceptSet from :class:`.inputs.GoLabels` (what ``load_labels`` returns)."""
    from ..go.ontology import NAMESPACES

    ontology = labels.ontology
    return ConceptSet(name, list(ontology.ids), list(ontology.names), np.asarray(ontology.namespace), NAMESPACES,
                      labels.annotations, labels.ancestors, False, tuple(labels.warnings))
