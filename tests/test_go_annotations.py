"""Annotation readers (two-column tables, GAF 2.x) and propagation, on real Swiss-Prot annotations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sae_engine.go.annotations import (
    AnnotationError,
    CountedWarnings,
    annotation_matrix,
    read_annotations,
    read_gaf,
    read_pairs,
)
from sae_engine.go.ontology import read_obo

DATA = Path(__file__).parent / "data" / "go"


@pytest.fixture(scope="module")
def go():
    return read_obo(DATA / "go_subset.obo")


def _raw_pairs() -> list[tuple[str, str]]:
    lines = (DATA / "annotations.tsv").read_text().splitlines()
    return [tuple(line.split("\t")) for line in lines if not line.startswith("#")]


def test_table_maps_secondary_ids_and_counts_obsolete(go) -> None:
    warnings = CountedWarnings()
    pairs = read_pairs(DATA / "annotations.tsv", go, warnings)
    raw = _raw_pairs()
    kinds = [go.resolve(go_id)[1] for _, go_id in raw]
    assert warnings.counts["annotations to obsolete GO terms skipped"] == kinds.count("obsolete") > 0
    assert warnings.counts["secondary GO ids mapped to their primary id"] == kinds.count("secondary") > 0
    assert len(pairs) == len(raw) - kinds.count("obsolete")
    secondary = next(i for i, k in enumerate(kinds) if k == "secondary")
    assert pairs[secondary - kinds[:secondary].count("obsolete")][1] == go.index[go.secondary[raw[secondary][1]]]
    assert "annotations.tsv:" in warnings.first["annotations to obsolete GO terms skipped"]


def test_gaf_reads_the_same_pairs_as_the_table(go) -> None:
    gaf = read_annotations(DATA / "annotations.gaf", go, CountedWarnings())
    proteins = {acc for acc, _ in gaf}
    table = [p for p in read_pairs(DATA / "annotations.tsv", go, CountedWarnings()) if p[0] in proteins]
    assert 30 <= len(proteins) <= 40 and gaf == table


def test_gaf_not_qualifier_and_bad_lines(go, tmp_path: Path) -> None:
    cols = ["UniProtKB", "P12345", "X", "enables", "GO:0004984", "REF", "IEA", "", "F", "", "", "protein",
            "taxon:9606", "20220101", "UniProt", "", ""]
    not_line = cols.copy()
    not_line[3] = "NOT|enables"
    path = tmp_path / "a.gaf"
    path.write_text("!gaf-version: 2.2\n" + "\t".join(cols) + "\n" + "\t".join(not_line) + "\n")
    warnings = CountedWarnings()
    assert read_gaf(path, go, warnings) == [("P12345", go.index["GO:0004984"])]
    assert warnings.counts == {"GAF annotations with the NOT qualifier skipped": 1}
    path.write_text("!gaf-version: 2.2\n" + "\t".join(cols[:9]) + "\n")
    with pytest.raises(AnnotationError, match=r"a.gaf:2: GAF line has 9 .*columns"):
        read_gaf(path, go, warnings)


def test_table_errors_and_unknown_ids(go, tmp_path: Path) -> None:
    path = tmp_path / "ann.tsv"
    path.write_text("P1\tGO:0004984\n\nP2 GO:0004984\n")
    with pytest.raises(AnnotationError, match=r"ann.tsv:3: expected 'accession<TAB>GO id'"):
        read_pairs(path, go, CountedWarnings())
    path.write_text("P1\tGO:0004984\nP2\tGO:12345\n")
    with pytest.raises(AnnotationError, match=r"ann.tsv:2: 'GO:12345' is not a GO id"):
        read_pairs(path, go, CountedWarnings())
    path.write_text("# header\nP1\tGO:0004984\tGO:0004984\nP2\tGO:0099999\n")
    warnings = CountedWarnings()
    assert read_pairs(path, go, warnings) == [("P1", go.index["GO:0004984"])] * 2
    (kind,) = warnings.counts
    assert "absent from" in kind and warnings.first[kind].endswith("ann.tsv:3: GO:0099999")


def test_a_header_line_is_skipped_only_as_the_first_line(go, tmp_path: Path) -> None:
    path = tmp_path / "ann.tsv"
    path.write_text("accession\tgo_id\nP1\tGO:0004984\n")
    assert read_pairs(path, go, CountedWarnings()) == [("P1", go.index["GO:0004984"])]
    path.write_text("P1\tGO:0004984\naccession\tgo_id\n")
    with pytest.raises(AnnotationError, match=r"ann.tsv:2: 'go_id' is not a GO id"):
        read_pairs(path, go, CountedWarnings())


@pytest.mark.parametrize("relations", [("is_a",), ("is_a", "part_of")])
def test_propagation_closes_each_protein_under_ancestors(go, relations: tuple[str, ...]) -> None:
    pairs = read_pairs(DATA / "annotations.tsv", go, CountedWarnings())
    population = (DATA / "population.txt").read_text().split()
    ann = annotation_matrix(pairs, go, population, relations)
    closure = go.ancestor_matrix(relations)
    direct: dict[str, set[int]] = {}
    for acc, term in pairs:
        direct.setdefault(acc, set()).add(term)
    assert ann.matrix.shape == (len(population), len(go)) and ann.matrix.dtype == bool
    for row, acc in enumerate(population):
        expected = set()
        for term in direct.get(acc, ()):
            expected |= set(closure.indices[closure.indptr[term]:closure.indptr[term + 1]].tolist())
        assert set(ann.matrix.indices[ann.matrix.indptr[row]:ann.matrix.indptr[row + 1]].tolist()) == expected
    # olfactory receptor activity is_a transmembrane signaling receptor activity: propagation gives every
    # olfactory receptor the parent term too.
    olfactory = ann.matrix[:, go.index["GO:0004984"]].toarray().ravel()
    assert olfactory.sum() >= 40
    assert np.all(ann.matrix[:, go.index["GO:0004888"]].toarray().ravel()[olfactory])


def test_population_restriction_is_counted(go) -> None:
    pairs = [("P1", 0), ("P2", 1), ("P3", 1), ("P3", 2)]
    warnings = CountedWarnings()
    ann = annotation_matrix(pairs, go, ["P1", "P4"], warnings=warnings)
    assert ann.proteins == ["P1", "P4"] and ann.matrix[1].nnz == 0 and ann.matrix[0, 0]
    assert warnings.counts == {"annotated proteins outside the population ignored": 2}
