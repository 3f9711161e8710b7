"""GO ontology readers (OBO, GO.sqlite) and the ancestor closure, on a real GO subgraph."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from sae_engine.go.ontology import NAMESPACES, OntologyError, load_ontology, read_go_sqlite, read_obo

DATA = Path(__file__).parent / "data" / "go"
OBO = DATA / "go_subset.obo"
SQLITE = DATA / "go_subset.sqlite"


def _edges(ontology) -> set[tuple[str, str, str]]:
    return {(ontology.ids[c], ontology.ids[p], ontology.relations[r])
            for c, p, r in zip(ontology.edge_child, ontology.edge_parent, ontology.edge_relation)}


def _walk_ancestors(ontology, term: int, relations: set[str]) -> set[int]:
    """Reference closure: explicit graph walk over the edge list."""
    parents: dict[int, list[int]] = {}
    for c, p, r in zip(ontology.edge_child.tolist(), ontology.edge_parent.tolist(), ontology.edge_relation.tolist()):
        if ontology.relations[r] in relations:
            parents.setdefault(c, []).append(p)
    seen, stack = {term}, [term]
    while stack:
        for p in parents.get(stack.pop(), []):
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def test_obo_and_sqlite_give_the_same_ontology() -> None:
    a, b = read_obo(OBO), read_go_sqlite(SQLITE)
    assert a.ids == b.ids and a.names == b.names
    assert np.array_equal(a.namespace, b.namespace)
    assert _edges(a) == _edges(b)
    assert a.secondary == b.secondary and a.obsolete == b.obsolete
    assert load_ontology(SQLITE).ids == a.ids  # sniffed by header, not by suffix


def test_real_terms_namespaces_secondary_and_obsolete() -> None:
    go = read_obo(OBO)
    i = go.index["GO:0004984"]
    assert go.names[i] == "olfactory receptor activity" and NAMESPACES[go.namespace[i]] == "MF"
    assert NAMESPACES[go.namespace[go.index["GO:0005840"]]] == "CC"
    assert NAMESPACES[go.namespace[go.index["GO:0006412"]]] == "BP"
    # GO:0030529 (ribonucleoprotein complex, 2014) is a secondary id of GO:1990904 in 2022.
    assert go.resolve("GO:0030529") == (go.index["GO:1990904"], "secondary")
    assert go.resolve("GO:0006184") == (None, "obsolete")
    assert go.resolve("GO:9999999") == (None, "unknown")
    assert not set(go.obsolete) & set(go.ids)
    assert {"is_a", "part_of"} <= set(go.relations)


@pytest.mark.parametrize("relations", [("is_a",), ("is_a", "part_of")])
def test_ancestor_closure_matches_graph_walk(relations: tuple[str, ...]) -> None:
    go = read_obo(OBO)
    closure = go.ancestor_matrix(relations)
    for term in range(len(go)):
        got = set(closure.indices[closure.indptr[term]:closure.indptr[term + 1]].tolist())
        assert got == _walk_ancestors(go, term, set(relations)), go.ids[term]
    roots = {go.index[r] for r in ("GO:0008150", "GO:0003674", "GO:0005575")}
    with_part_of = go.ancestor_matrix(("is_a", "part_of"))
    # Every term reaches its namespace root along is_a + part_of.
    for term in range(len(go)):
        assert roots & set(with_part_of.indices[with_part_of.indptr[term]:with_part_of.indptr[term + 1]].tolist())


def test_part_of_adds_ancestors() -> None:
    go = read_obo(OBO)
    smell = go.index["GO:0050911"]  # detection of chemical stimulus ... smell, part_of sensory perception of smell
    parent = go.index["GO:0007608"]
    assert go.ancestor_matrix(("is_a",))[smell, parent] == 0
    assert go.ancestor_matrix(("is_a", "part_of"))[smell, parent] == 1


def test_write_obo_round_trip(tmp_path: Path) -> None:
    go = read_go_sqlite(SQLITE)
    go.write_obo(tmp_path / "go.obo")
    back = read_obo(tmp_path / "go.obo")
    assert back.ids == go.ids and _edges(back) == _edges(go)
    assert back.secondary == go.secondary and back.obsolete == go.obsolete


def test_unknown_relation_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown GO relation"):
        read_obo(OBO).parent_matrix(("is_a", "has_part"))


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(OntologyError, match="missing.obo"):
        load_ontology(tmp_path / "missing.obo")
    dangling = tmp_path / "dangling.obo"
    dangling.write_text("format-version: 1.2\nontology: go\n\n[Term]\nid: GO:0000001\nname: a\n"
                        "namespace: biological_process\nis_a: GO:0000002 ! b\n")
    with pytest.raises(OntologyError, match=r"dangling.obo.*GO:0000001 -> GO:0000002"):
        read_obo(dangling)
    bad_ns = tmp_path / "ns.obo"
    bad_ns.write_text("format-version: 1.2\nontology: go\n\n[Term]\nid: GO:0000001\nname: a\nnamespace: pathway\n")
    with pytest.raises(OntologyError, match="ns.obo.*pathway"):
        read_obo(bad_ns)
    not_go = tmp_path / "other.sqlite"
    sqlite3.connect(not_go).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(OntologyError, match="other.sqlite.*not a GO.sqlite"):
        load_ontology(not_go)


def _full_go_sqlite() -> Path | None:
    """GO.db's GO.sqlite: $SAE_ENGINE_GO_SQLITE, else the one `sae-engine data prepare` made."""
    from sae_engine.esm.prepare import data_dir

    path = Path(os.environ.get("SAE_ENGINE_GO_SQLITE") or data_dir() / "go.sqlite")
    return path if path.exists() else None


@pytest.mark.skipif(_full_go_sqlite() is None, reason="no GO.sqlite: run `sae-engine data prepare` or set SAE_ENGINE_GO_SQLITE")
def test_full_go_sqlite() -> None:
    go = read_go_sqlite(_full_go_sqlite())
    counts = np.bincount(go.namespace, minlength=3)
    assert len(go) > 40_000 and counts.min() > 4_000
    assert len(go.secondary) > 1_000 and len(go.obsolete) > 1_000
    closure = go.ancestor_matrix()
    assert np.array_equal(closure.diagonal(), np.ones(len(go), dtype=bool))
