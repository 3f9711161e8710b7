"""Protein -> GO annotations: GAF 2.x and two-column tables, propagated once to a sparse matrix.

The propagated matrix (``[P, T]`` boolean CSR, proteins x ontology terms) is built once and
shared by every feature's test: a protein annotated to a term is annotated to all its ancestors
(true-path rule), along ``is_a`` by default and ``part_of`` on request.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .ontology import GO_ID, Ontology

_GAF_MIN_COLUMNS = 15  # GAF 2.x has 17 columns; the last two are optional in 2.0


class AnnotationError(ValueError):
    """A malformed input line; the message names the file and line."""


@dataclass
class CountedWarnings:
    """Warnings counted by kind, each with its first occurrence, so nothing is dropped silently."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, where: str, n: int = 1) -> None:
        """Count ``n`` occurrences of ``kind``; ``where`` (file:line: detail) is kept for the first one."""
        if n <= 0:
            return
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.first.setdefault(kind, where)

    def messages(self) -> list[str]:
        """One line per kind: ``kind: count (first: where)``."""
        return [f"{kind}: {count} (first: {self.first[kind]})" for kind, count in self.counts.items()]


def _data_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for each line that is neither blank nor a ``!``/``#`` comment."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read: {error.strerror}") from error
    with handle:
        try:
            for number, line in enumerate(handle, start=1):
                line = line.rstrip("\r\n")
                if line.strip() and line[0] not in "!#":
                    yield number, line
        except UnicodeDecodeError as error:
            raise AnnotationError(f"{path}: not UTF-8 text ({error.reason})") from error


def _resolve(ontology: Ontology, go_id: str, where: str, warnings: CountedWarnings) -> int | None:
    """Term index for ``go_id`` or None (obsolete/unknown, counted); malformed ids are errors."""
    if not GO_ID.fullmatch(go_id):
        raise AnnotationError(f"{where}: {go_id!r} is not a GO id (GO:NNNNNNN)")
    index, how = ontology.resolve(go_id)
    if how == "secondary":
        warnings.add("secondary GO ids mapped to their primary id", f"{where}: {go_id}")
    elif how == "obsolete":
        warnings.add("annotations to obsolete GO terms skipped", f"{where}: {go_id}")
    elif how == "unknown":
        warnings.add(f"annotations to GO ids absent from {ontology.source or 'the ontology'} skipped",
                     f"{where}: {go_id}")
    return index


def read_gaf(path: str | Path, ontology: Ontology, warnings: CountedWarnings) -> list[tuple[str, int]]:
    """``(DB object id, term index)`` pairs from a GAF 2.x file.

    Column 2 (DB Object ID, e.g. a UniProtKB accession) names the protein, column 5 the term.
    Lines whose qualifier (column 4) contains ``NOT`` state the absence of a function and are
    skipped (counted).
    """
    path = Path(path)
    pairs: list[tuple[str, int]] = []
    for number, line in _data_lines(path):
        cols = line.split("\t")
        where = f"{path}:{number}"
        if len(cols) < _GAF_MIN_COLUMNS:
            raise AnnotationError(f"{where}: GAF line has {len(cols)} tab-separated columns, expected 15 to 17")
        accession, qualifier, go_id = cols[1].strip(), cols[3], cols[4].strip()
        if not accession:
            raise AnnotationError(f"{where}: empty DB Object ID (column 2)")
        if "NOT" in qualifier.split("|"):
            warnings.add("GAF annotations with the NOT qualifier skipped", f"{where}: {accession} {go_id}")
            continue
        index = _resolve(ontology, go_id, where, warnings)
        if index is not None:
            pairs.append((accession, index))
    return pairs


def read_pairs(path: str | Path, ontology: Ontology, warnings: CountedWarnings) -> list[tuple[str, int]]:
    """``(accession, term index)`` pairs from ``accession<TAB>GO id`` lines.

    Repeated pairs are allowed. More GO ids may follow on the same line, tab-separated (the
    layout of ``goasp_annot.dat``). Blank lines and lines starting with ``#`` or ``!`` are skipped,
    and so is a first data line whose second column does not start with ``GO:`` (a header such
    as ``accession<TAB>go_id``).
    """
    path = Path(path)
    pairs: list[tuple[str, int]] = []
    for position, (number, line) in enumerate(_data_lines(path)):
        cols = line.split("\t")
        where = f"{path}:{number}"
        if position == 0 and len(cols) >= 2 and not cols[1].strip().upper().startswith("GO:"):
            continue
        accession = cols[0].strip()
        if len(cols) < 2 or not accession:
            raise AnnotationError(f"{where}: expected 'accession<TAB>GO id', got {line[:80]!r}")
        for go_id in cols[1:]:
            index = _resolve(ontology, go_id.strip(), where, warnings)
            if index is not None:
                pairs.append((accession, index))
    return pairs


def read_annotations(path: str | Path, ontology: Ontology, warnings: CountedWarnings) -> list[tuple[str, int]]:
    """Read a GAF (recognised by its ``!gaf-version`` header) or a two-column table."""
    path = Path(path)
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            head = handle.readline()
    except OSError as error:
        raise AnnotationError(f"{path}: cannot read: {error.strerror}") from error
    if head.startswith("!gaf-version"):
        return read_gaf(path, ontology, warnings)
    return read_pairs(path, ontology, warnings)


@dataclass(frozen=True)
class AnnotationMatrix:
    """Propagated annotations of a population.

    Attributes:
        proteins: ``[P]`` accessions, the row order.
        matrix: ``[P, T]`` boolean CSR over the ontology's terms, closed under ancestors.
        relations: relations propagated along.
    """

    proteins: list[str]
    matrix: sp.csr_matrix
    relations: tuple[str, ...]

    @property
    def index(self) -> dict[str, int]:
        """Accession -> row."""
        return {acc: i for i, acc in enumerate(self.proteins)}


def propagate(direct: sp.spmatrix, ancestors: sp.spmatrix) -> sp.csr_matrix:
    """``[P, T]`` direct annotations times the ``[T, T]`` reflexive ancestor closure, as a boolean CSR."""
    product = direct.astype(np.int32).tocsr() @ ancestors.astype(np.int32).tocsr()
    product.data[:] = 1  # counts of paths are irrelevant: membership only
    return product.astype(bool)


def annotation_matrix(pairs: Iterable[tuple[str, int]], ontology: Ontology,
                      population: list[str] | None = None, relations: Iterable[str] = ("is_a",),
                      warnings: CountedWarnings | None = None) -> AnnotationMatrix:
    """Build the propagated ``[P, T]`` matrix from ``(accession, term index)`` pairs.

    Args:
        pairs: direct annotations; repeats are harmless.
        ontology: gives ``T`` and the ancestor closure.
        population: row order; pairs of other proteins are counted in ``warnings`` and left out.
            ``None`` takes every annotated protein, sorted.
        relations: edge types to propagate along (``is_a``; add ``part_of`` for the full true-path rule).
    """
    relations = tuple(relations)
    pairs = list(pairs)
    if population is None:
        population = sorted({acc for acc, _ in pairs})
    row_of = {acc: i for i, acc in enumerate(population)}
    rows = np.fromiter((row_of.get(acc, -1) for acc, _ in pairs), dtype=np.int64, count=len(pairs))
    cols = np.fromiter((term for _, term in pairs), dtype=np.int64, count=len(pairs))
    outside = rows < 0
    if warnings is not None and outside.any():
        first = next(acc for (acc, _), out in zip(pairs, outside) if out)
        outside_proteins = len({acc for (acc, _), out in zip(pairs, outside) if out})
        warnings.add("annotated proteins outside the population ignored", first, outside_proteins)
    rows, cols = rows[~outside], cols[~outside]
    direct = sp.csr_matrix((np.ones(rows.size, dtype=np.int32), (rows, cols)),
                           shape=(len(population), len(ontology)))
    return AnnotationMatrix(list(population), propagate(direct, ontology.ancestor_matrix(relations)), relations)
