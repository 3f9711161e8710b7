"""The Gene Ontology as arrays: terms, typed parent edges, secondary ids, obsolete terms.

Two sources give the same :class:`Ontology`:

* an OBO file (``go.obo`` / ``go-basic.obo``), parsed with ``obonet``;
* Bioconductor's ``GO.sqlite`` (the ``GO.db`` package, Debian ``r-bioc-go.db``).

Terms are numbered ``0..T-1`` in the order of :attr:`Ontology.ids`; every matrix over terms in
``sae_engine.go`` uses that numbering. Relation names follow OBO (``is_a``, ``part_of``,
``regulates``, ``positively_regulates``, ``negatively_regulates``).
"""
from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

NAMESPACES = ("BP", "MF", "CC")
_OBO_NAMESPACE = {"biological_process": "BP", "molecular_function": "MF", "cellular_component": "CC"}
_NAMESPACE_OBO = {short: long for long, short in _OBO_NAMESPACE.items()}
# GO.db spells relation types in words; OBO uses identifiers.
_SQLITE_RELATION = {
    "isa": "is_a",
    "part of": "part_of",
    "regulates": "regulates",
    "positively regulates": "positively_regulates",
    "negatively regulates": "negatively_regulates",
}
GO_ID = re.compile(r"GO:\d{7}")


class OntologyError(ValueError):
    """A GO file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Ontology:
    """GO terms and their typed ``child -> parent`` edges.

    Attributes:
        ids: ``[T]`` primary GO ids of the live (non-obsolete) terms.
        names: ``[T]`` term names.
        namespace: ``[T]`` int8 index into :data:`NAMESPACES`.
        edge_child, edge_parent: ``[E]`` int64 term indices, one edge per (child, parent, relation).
        edge_relation: ``[E]`` int16 index into ``relations``.
        relations: relation names present in the source.
        secondary: secondary (alternative) id -> primary id.
        obsolete: obsolete id -> name.
        source: where it was read from (for messages).
    """

    ids: list[str]
    names: list[str]
    namespace: np.ndarray
    edge_child: np.ndarray
    edge_parent: np.ndarray
    edge_relation: np.ndarray
    relations: tuple[str, ...]
    secondary: dict[str, str]
    obsolete: dict[str, str]
    source: str = ""
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {go_id: i for i, go_id in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def resolve(self, go_id: str) -> tuple[int | None, str]:
        """Term index of ``go_id`` and how it was found.

        Returns ``(index, "primary" | "secondary")`` for a live term, ``(None, "obsolete")`` and
        ``(None, "unknown")`` otherwise.
        """
        i = self.index.get(go_id)
        if i is not None:
            return i, "primary"
        primary = self.secondary.get(go_id)
        if primary is not None and primary in self.index:
            return self.index[primary], "secondary"
        if go_id in self.obsolete:
            return None, "obsolete"
        return None, "unknown"

    def parent_matrix(self, relations: Iterable[str] = ("is_a",)) -> sp.csr_matrix:
        """``[T, T]`` boolean CSR: ``[child, parent]`` is set for an edge of one of ``relations``."""
        wanted = set(relations)
        unknown = wanted - set(_SQLITE_RELATION.values())
        if unknown:
            raise ValueError(f"unknown GO relation(s) {sorted(unknown)}; known: {sorted(_SQLITE_RELATION.values())}")
        codes = [i for i, name in enumerate(self.relations) if name in wanted]
        keep = np.isin(self.edge_relation, codes)
        n = len(self.ids)
        data = np.ones(int(keep.sum()), dtype=bool)
        parents = sp.csr_matrix((data, (self.edge_child[keep], self.edge_parent[keep])), shape=(n, n), dtype=bool)
        parents.sum_duplicates()
        return parents

    def ancestor_matrix(self, relations: Iterable[str] = ("is_a",)) -> sp.csr_matrix:
        """``[T, T]`` boolean CSR: ``[term, ancestor]`` for every ancestor along ``relations``, self included.

        Reflexive-transitive closure by repeated squaring of ``I + P``: about log2(depth) sparse
        products (GO is about 20 levels deep), instead of one graph walk per term.
        """
        n = len(self.ids)
        closure = (sp.identity(n, dtype=bool, format="csr") + self.parent_matrix(relations)).astype(bool)
        while True:
            # Products in int32 (scipy sums booleans as booleans, but be explicit), then back to a mask.
            squared = (closure.astype(np.int32) @ closure.astype(np.int32)).astype(bool).tocsr()
            if squared.nnz == closure.nnz:
                return squared
            closure = squared

    def write_obo(self, path: str | Path, data_version: str = "") -> None:
        """Write the ontology as an OBO 1.2 file that :func:`read_obo` reads back unchanged."""
        children: dict[int, list[tuple[str, int]]] = {}
        for child, parent, rel in zip(self.edge_child.tolist(), self.edge_parent.tolist(), self.edge_relation.tolist()):
            children.setdefault(child, []).append((self.relations[rel], parent))
        alt_ids: dict[str, list[str]] = {}
        for secondary, primary in sorted(self.secondary.items()):
            alt_ids.setdefault(primary, []).append(secondary)
        lines = ["format-version: 1.2"]
        if data_version:
            lines.append(f"data-version: {data_version}")
        lines += ["ontology: go", ""]
        for i in np.argsort(self.ids, kind="stable").tolist():
            go_id = self.ids[i]
            lines += ["[Term]", f"id: {go_id}", f"name: {self.names[i]}",
                      f"namespace: {_NAMESPACE_OBO[NAMESPACES[self.namespace[i]]]}"]
            lines += [f"alt_id: {alt}" for alt in alt_ids.get(go_id, [])]
            edges = sorted(children.get(i, []), key=lambda e: (e[0] != "is_a", e[0], self.ids[e[1]]))
            for rel, parent in edges:
                target = f"{self.ids[parent]} ! {self.names[parent]}"
                lines.append(f"is_a: {target}" if rel == "is_a" else f"relationship: {rel} {target}")
            lines.append("")
        for go_id, name in sorted(self.obsolete.items()):
            lines += ["[Term]", f"id: {go_id}", f"name: {name}", "is_obsolete: true", ""]
        Path(path).write_text("\n".join(lines), encoding="utf-8")


def _build(terms: list[tuple[str, str, str]], edges: list[tuple[str, str, str]], secondary: dict[str, str],
           obsolete: dict[str, str], source: str) -> Ontology:
    """Assemble an :class:`Ontology` from ``(id, name, namespace)`` terms and ``(child, parent, relation)`` edges."""
    ids = [t[0] for t in terms]
    index = {go_id: i for i, go_id in enumerate(ids)}
    relations = tuple(sorted({rel for _, _, rel in edges}))
    rel_code = {name: i for i, name in enumerate(relations)}
    dangling = [(c, p) for c, p, _ in edges if c not in index or p not in index]
    if dangling:
        child, parent = dangling[0]
        raise OntologyError(f"{source}: {len(dangling)} edge(s) name a term that is not a live GO term "
                            f"(first: {child} -> {parent})")
    return Ontology(
        ids=ids,
        names=[t[1] for t in terms],
        namespace=np.array([NAMESPACES.index(t[2]) for t in terms], dtype=np.int8),
        edge_child=np.array([index[c] for c, _, _ in edges], dtype=np.int64),
        edge_parent=np.array([index[p] for _, p, _ in edges], dtype=np.int64),
        edge_relation=np.array([rel_code[r] for _, _, r in edges], dtype=np.int16),
        relations=relations,
        secondary={alt: primary for alt, primary in secondary.items() if alt not in index},
        obsolete=obsolete,
        source=source,
    )


def read_obo(path: str | Path) -> Ontology:
    """Read GO from an OBO file (``go.obo``, ``go-basic.obo`` or a subset of them).

    ``alt_id`` lines become secondary ids; terms with ``is_obsolete: true`` are listed in
    :attr:`Ontology.obsolete` and are not terms of the graph.
    """
    import obonet

    path = Path(path)
    try:
        graph = obonet.read_obo(path, ignore_obsolete=False)
    except (OSError, UnicodeDecodeError) as error:
        raise OntologyError(f"{path}: cannot read OBO file: {error}") from error
    except Exception as error:  # obonet raises bare ValueError/KeyError on malformed stanzas
        raise OntologyError(f"{path}: malformed OBO file: {error!r}") from error
    terms: list[tuple[str, str, str]] = []
    secondary: dict[str, str] = {}
    obsolete: dict[str, str] = {}
    for go_id, data in graph.nodes(data=True):
        if not GO_ID.fullmatch(go_id):
            continue  # other ontologies' ids only occur as cross-references in GO files
        if not data:
            continue  # a node obonet made for an edge target that has no stanza: caught as dangling
        if str(data.get("is_obsolete", "false")).lower() == "true":
            obsolete[go_id] = data.get("name", "")
            continue
        ns = _OBO_NAMESPACE.get(data.get("namespace", ""))
        if ns is None:
            raise OntologyError(f"{path}: term {go_id} has namespace {data.get('namespace')!r}; "
                                f"expected one of {sorted(_OBO_NAMESPACE)}")
        terms.append((go_id, data.get("name", ""), ns))
        for alt in data.get("alt_id", []):
            secondary[alt] = go_id
    edges = [(child, parent, rel) for child, parent, rel in graph.edges(keys=True)
             if GO_ID.fullmatch(child) and GO_ID.fullmatch(parent)]
    if not terms:
        raise OntologyError(f"{path}: no GO terms found")
    return _build(terms, edges, secondary, obsolete, str(path))


def read_go_sqlite(path: str | Path) -> Ontology:
    """Read GO from Bioconductor's ``GO.sqlite`` (tables ``go_term``, ``go_{bp,mf,cc}_parents``,
    ``go_obsolete``, ``go_synonym``). The pseudo-term ``all`` above the three roots is left out."""
    path = Path(path)
    if not path.is_file():
        raise OntologyError(f"{path}: no such file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT _id, go_id, term, ontology FROM go_term").fetchall()
            edge_rows = []
            for table in ("go_bp_parents", "go_mf_parents", "go_cc_parents"):
                edge_rows += con.execute(f"SELECT _id, _parent_id, relationship_type FROM {table}").fetchall()
            obsolete = dict(con.execute("SELECT go_id, term FROM go_obsolete").fetchall())
            synonyms = con.execute("SELECT _id, secondary FROM go_synonym WHERE like_go_id = 1").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as error:
        raise OntologyError(f"{path}: not a GO.sqlite database ({error})") from error
    by_rowid = {rowid: (go_id, name, ns) for rowid, go_id, name, ns in rows if ns in NAMESPACES}
    edges = []
    for child, parent, rel in edge_rows:
        if child not in by_rowid or parent not in by_rowid:
            continue  # edges to the pseudo-term "all"
        if rel not in _SQLITE_RELATION:
            raise OntologyError(f"{path}: unknown relationship_type {rel!r}")
        edges.append((by_rowid[child][0], by_rowid[parent][0], _SQLITE_RELATION[rel]))
    secondary = {alt: by_rowid[rowid][0] for rowid, alt in synonyms if rowid in by_rowid and alt}
    return _build(list(by_rowid.values()), edges, secondary, obsolete, str(path))


def load_ontology(path: str | Path) -> Ontology:
    """Read GO from an OBO file or a ``GO.sqlite`` database (recognised by its SQLite header)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            magic = handle.read(16)
    except OSError as error:
        raise OntologyError(f"{path}: cannot read ontology: {error.strerror}") from error
    if magic == b"SQLite format 3\x00":
        return read_go_sqlite(path)
    return read_obo(path)
