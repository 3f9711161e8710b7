"""Rebuild the GO test fixtures from the Debian packages named in README.md.

    python tests/data/go/make_fixtures.py GO.sqlite METASTUDENT_DATASET_DIR

METASTUDENT_DATASET_DIR is ``usr/share/metastudent-data/dataset_201401`` of an unpacked
``metastudent-data`` package. Output goes beside this script. Deterministic (fixed seed).
"""
from __future__ import annotations

import random
import sqlite3
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

import numpy as np
import scipy.sparse as sp

from sae_engine.go.ontology import NAMESPACES, Ontology, read_go_sqlite

# Families a protein-level SAE feature should isolate (MF terms, direct annotations).
THEMES = {"olfactory": "GO:0004984", "ribosome": "GO:0003735", "kinase": "GO:0004672"}
PER_THEME = 40
RANDOM_PROTEINS = 160
MAX_TERMS = 230  # size of the is_a + part_of ancestor closure kept
GAF_PROTEINS = 40


def read_metastudent(folder: Path) -> dict[str, list[str]]:
    """accession -> raw GO ids (with repeats) over the MFO, BPO and CCO tables."""
    table: dict[str, list[str]] = {}
    for aspect in ("MFO", "BPO", "CCO"):
        with (folder / aspect / "goasp_annot.dat").open() as handle:
            for line in handle:
                acc, *ids = line.rstrip("\n").split("\t")
                table.setdefault(acc, []).extend(ids)
    return table


def closure(ancestors: sp.csr_matrix, seeds: set[int]) -> set[int]:
    out: set[int] = set()
    for s in seeds:
        out.update(ancestors.indices[ancestors.indptr[s]:ancestors.indptr[s + 1]].tolist())
    return out


def subset(ontology: Ontology, keep: set[int], raw_ids: set[str]) -> Ontology:
    """The ontology restricted to ``keep``, with the secondary/obsolete ids that ``raw_ids`` use."""
    old = sorted(keep, key=lambda i: ontology.ids[i])
    new_of = {o: i for i, o in enumerate(old)}
    edges = [(new_of[c], new_of[p], r) for c, p, r in zip(ontology.edge_child.tolist(), ontology.edge_parent.tolist(),
                                                          ontology.edge_relation.tolist()) if c in new_of and p in new_of]
    kept_ids = {ontology.ids[i] for i in keep}
    return Ontology(
        ids=[ontology.ids[i] for i in old], names=[ontology.names[i] for i in old],
        namespace=ontology.namespace[old],
        edge_child=np.array([e[0] for e in edges], dtype=np.int64),
        edge_parent=np.array([e[1] for e in edges], dtype=np.int64),
        edge_relation=np.array([e[2] for e in edges], dtype=np.int16), relations=ontology.relations,
        secondary={a: p for a, p in ontology.secondary.items() if p in kept_ids and a in raw_ids},
        obsolete={o: n for o, n in ontology.obsolete.items() if o in raw_ids},
    )


def write_sqlite(ontology: Ontology, path: Path) -> None:
    """The GO.db tables the reader uses, same schema, restricted to ``ontology``."""
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE go_term (_id INTEGER PRIMARY KEY, go_id CHAR(10) NOT NULL UNIQUE, term VARCHAR(255) NOT NULL,
                              ontology VARCHAR(9) NOT NULL, definition TEXT NULL);
        CREATE TABLE go_obsolete (go_id CHAR(10) PRIMARY KEY, term VARCHAR(255) NOT NULL,
                                  ontology VARCHAR(9) NOT NULL, definition TEXT NULL);
        CREATE TABLE go_synonym (_id INTEGER NOT NULL, synonym VARCHAR(255) NOT NULL, secondary CHAR(10) NULL,
                                 like_go_id SMALLINT);
        CREATE TABLE go_bp_parents (_id INTEGER NOT NULL, _parent_id INTEGER NOT NULL, relationship_type VARCHAR(7) NOT NULL);
        CREATE TABLE go_mf_parents (_id INTEGER NOT NULL, _parent_id INTEGER NOT NULL, relationship_type VARCHAR(7) NOT NULL);
        CREATE TABLE go_cc_parents (_id INTEGER NOT NULL, _parent_id INTEGER NOT NULL, relationship_type VARCHAR(7) NOT NULL);
    """)
    rowid = {i: i + 2 for i in range(len(ontology))}
    all_id = len(ontology) + 2  # GO.db's pseudo-term above the three roots
    con.executemany("INSERT INTO go_term VALUES (?, ?, ?, ?, NULL)",
                    [(rowid[i], ontology.ids[i], ontology.names[i], NAMESPACES[ontology.namespace[i]])
                     for i in range(len(ontology))] + [(all_id, "all", "all", "universal")])
    con.executemany("INSERT INTO go_obsolete VALUES (?, ?, 'BP', NULL)", sorted(ontology.obsolete.items()))
    con.executemany("INSERT INTO go_synonym VALUES (?, ?, ?, 1)",
                    [(rowid[ontology.index[p]], a, a) for a, p in sorted(ontology.secondary.items())])
    words = {"is_a": "isa", "part_of": "part of", "regulates": "regulates",
             "positively_regulates": "positively regulates", "negatively_regulates": "negatively regulates"}
    for ns in NAMESPACES:
        rows = [(rowid[c], rowid[p], words[ontology.relations[r]])
                for c, p, r in zip(ontology.edge_child.tolist(), ontology.edge_parent.tolist(), ontology.edge_relation.tolist())
                if NAMESPACES[ontology.namespace[c]] == ns]
        rows += [(rowid[i], all_id, "isa") for i in range(len(ontology))
                 if NAMESPACES[ontology.namespace[i]] == ns and not (ontology.edge_child == i).any()]
        con.executemany(f"INSERT INTO go_{ns.lower()}_parents VALUES (?, ?, ?)", rows)
    con.commit()
    con.execute("VACUUM")
    con.close()


def main(go_sqlite: str, dataset: str) -> None:
    rng = random.Random(20140101)
    go = read_go_sqlite(go_sqlite)
    table = read_metastudent(Path(dataset))
    complete = sorted(acc for acc, ids in table.items() if len(set(ids)) >= 3)
    themed: dict[str, list[str]] = {}
    for theme, go_id in THEMES.items():
        members = [acc for acc in complete if go_id in table[acc]]
        themed[theme] = sorted(rng.sample(members, PER_THEME))
    chosen = set().union(*themed.values())
    others = sorted(set(complete) - chosen)
    population = sorted(chosen | set(rng.sample(others, RANDOM_PROTEINS)))

    # Seed terms by how many chosen proteins carry them, theme terms first, until the closure is full.
    counts: dict[int, int] = {}
    for acc in population:
        for raw in set(table[acc]):
            index, _ = go.resolve(raw)
            if index is not None:
                counts[index] = counts.get(index, 0) + 1
    ancestors = go.ancestor_matrix(("is_a", "part_of"))
    seeds = {go.index[g] for g in THEMES.values()}
    for term in sorted(counts, key=lambda t: (-counts[t], go.ids[t])):
        grown = closure(ancestors, seeds | {term})
        if len(grown) <= MAX_TERMS:
            seeds.add(term)
    keep = closure(ancestors, seeds)
    kept_ids = {go.ids[i] for i in keep}

    def wanted(raw: str) -> bool:
        index, how = go.resolve(raw)
        return how == "obsolete" or (index is not None and go.ids[index] in kept_ids)

    pairs = [(acc, raw) for acc in population for raw in table[acc] if wanted(raw)]
    small = subset(go, keep, {raw for _, raw in pairs})
    small.write_obo(HERE / "go_subset.obo", data_version="releases/2022-07-01 (subset)")
    write_sqlite(small, HERE / "go_subset.sqlite")
    (HERE / "population.txt").write_text("".join(f"{acc}\n" for acc in population))
    (HERE / "annotations.tsv").write_text("# accession\tGO id (metastudent-data dataset_201401; GO ids as of 2014)\n"
                                          + "".join(f"{acc}\t{raw}\n" for acc, raw in pairs))
    aspect = {"BP": "P", "MF": "F", "CC": "C"}
    relation = {"BP": "involved_in", "MF": "enables", "CC": "located_in"}
    gaf_proteins = set(rng.sample(population, GAF_PROTEINS))
    gaf = ["!gaf-version: 2.2", "!Columns 2, 5 and 9 are from metastudent-data; 3, 4, 6, 7, 12-15 are placeholders."]
    for acc, raw in pairs:
        index, _ = go.resolve(raw)
        if acc in gaf_proteins and index is not None:
            ns = NAMESPACES[go.namespace[index]]
            gaf.append("\t".join(["UniProtKB", acc, acc, relation[ns], raw, "GO_REF:0000000", "ND", "", aspect[ns],
                                  "", "", "protein", "taxon:1", "20140101", "UniProt", "", ""]))
    (HERE / "annotations.gaf").write_text("\n".join(gaf) + "\n")
    study = [(f"{theme}_feature", acc) for theme, members in themed.items() for acc in members[:25]]
    study += [("random_feature", acc) for acc in rng.sample(population, 30)]
    (HERE / "study.tsv").write_text("".join(f"{f}\t{a}\n" for f, a in study))
    print(f"{len(small)} terms, {len(population)} proteins, {len(pairs)} pairs, "
          f"{len(small.secondary)} secondary ids, {len(small.obsolete)} obsolete ids")


if __name__ == "__main__":
    main(*sys.argv[1:])
