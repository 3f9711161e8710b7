"""GO enrichment of every SAE feature at once, timed against goatools' per-feature loop.

    sae-engine bench enrich [--proteins 16000] [--features 20000] [--go GO.sqlite|go.obo]
                            [--goatools-features 20] [--min-overlap 2] [--json]

Inputs are synthetic but shaped like the real thing:

* GO: the real DAG from ``--go`` or ``$SAE_ENGINE_GO_SQLITE`` when given, else a synthetic DAG
  of 30,000 terms (three namespaces, 12 levels, 1-2 is_a parents a term).
* Annotations: proteins fall into families (Zipf sizes); each carries most of its family's
  signature terms plus a few terms drawn by Zipf popularity, about 10 direct terms in all, then
  propagated along is_a (about 60-100 terms per protein on the real GO).
* Features: study sets of about 5-200 proteins (log-uniform), half from one family, from a sparse
  ``[P, F]`` activation matrix through :func:`study_sets`.

goatools (when installed) runs ``GOEnrichmentStudy.run_study`` on the first features; its
per-feature time is scaled to all features for the ratio. Both sides run on one core (numpy and
scipy.sparse here, pure Python there), so CPU seconds compare them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..go.annotations import annotation_matrix
from ..go.enrich import DEFAULT_MIN_OVERLAP, Enrichment, enrich_features, study_sets
from ..go.ontology import Ontology, load_ontology
from .harness import machine_info, machine_line, print_json


def synthetic_ontology(n_terms: int, rng: np.random.Generator) -> Ontology:
    """A GO-like DAG: three rooted namespaces of 12 levels (sizes growing about 1.8x a level);
    each term has an is_a parent on the level above and, 40% of the time, a second one higher up."""
    namespace = np.sort(rng.choice(3, size=n_terms, p=[0.64, 0.26, 0.10])).astype(np.int8)
    child, parent = [], []
    for ns in range(3):
        members = np.flatnonzero(namespace == ns)
        widths = 1.8 ** np.arange(12)
        bounds = np.r_[0, np.maximum(np.cumsum(widths / widths.sum() * (members.size - 1)).astype(int) + 1, 1)]
        bounds[-1] = members.size
        for level in range(1, 12):
            lo, hi = bounds[level], bounds[level + 1]
            if hi <= lo:
                continue
            # Parents from the level above, or from any higher level when that one is empty
            # (small DAGs): always an earlier index, so the graph stays acyclic.
            above = bounds[level - 1] if bounds[level - 1] < lo else 0
            child.append(members[lo:hi])
            parent.append(members[rng.integers(above, lo, hi - lo)])
            extra = np.flatnonzero(rng.random(hi - lo) < 0.4)
            child.append(members[lo:hi][extra])
            parent.append(members[rng.integers(0, bounds[level], extra.size)])
    child_, parent_ = np.concatenate(child), np.concatenate(parent)
    ids = [f"GO:{i:07d}" for i in range(n_terms)]
    return Ontology(ids=ids, names=[f"term {i}" for i in range(n_terms)], namespace=namespace,
                    edge_child=child_.astype(np.int64), edge_parent=parent_.astype(np.int64),
                    edge_relation=np.zeros(child_.size, dtype=np.int16), relations=("is_a",), secondary={}, obsolete={})


@dataclass
class Inputs:
    ontology: Ontology
    proteins: list[str]
    pairs: list[tuple[str, int]]
    activations: sp.csc_matrix  # [P, F]


def make_inputs(n_proteins: int, n_features: int, go: str | None, seed: int = 0, n_terms: int = 30_000) -> Inputs:
    """Synthetic annotations and activations over a real or synthetic GO (``n_terms`` terms; see
    the module doc)."""
    rng = np.random.default_rng(seed)
    ontology = load_ontology(go) if go else synthetic_ontology(n_terms, rng)
    n_terms = len(ontology)
    popularity = 1.0 / np.arange(1, n_terms + 1) ** 0.8
    popularity = rng.permutation(popularity / popularity.sum())
    n_families = max(n_proteins // 16, 1)
    family_size = 1.0 / np.arange(1, n_families + 1)
    family = rng.choice(n_families, size=n_proteins, p=family_size / family_size.sum())
    signature = rng.choice(n_terms, size=(n_families, 6), p=popularity)
    proteins = [f"P{i:06d}" for i in range(n_proteins)]
    pairs: list[tuple[str, int]] = []
    for i, fam in enumerate(family.tolist()):
        terms = signature[fam][rng.random(6) < 0.7].tolist() + rng.choice(n_terms, size=rng.integers(1, 9), p=popularity).tolist()
        pairs += [(proteins[i], t) for t in terms]
    # Study sets: log-uniform sizes in [5, 200], half the members from one family.
    sizes = np.exp(rng.uniform(np.log(5), np.log(200), n_features)).astype(int)
    by_family = np.argsort(family, kind="stable")
    starts = np.searchsorted(family[by_family], np.arange(n_families))
    counts = np.bincount(family, minlength=n_families)
    rows, cols = [], []
    for f, size in enumerate(sizes.tolist()):
        fam = int(family[rng.integers(n_proteins)])
        own = by_family[starts[fam] + rng.choice(counts[fam], size=min(size // 2, counts[fam]), replace=False)]
        members = np.unique(np.concatenate([own, rng.choice(n_proteins, size=size - own.size, replace=False)]))
        rows.append(members)
        cols.append(np.full(members.size, f))
    rows_, cols_ = np.concatenate(rows), np.concatenate(cols)
    values = rng.exponential(1.0, rows_.size).astype(np.float32)
    activations = sp.csc_matrix((values, (rows_, cols_)), shape=(n_proteins, n_features))
    return Inputs(ontology, proteins, pairs, activations)


def run_ours(inp: Inputs, min_overlap: int) -> tuple[Enrichment, dict[str, tuple[float, float]]]:
    """Propagation, study sets and the all-pairs test, each timed as (wall, CPU) seconds.

    CPU time is what a stage costs on an idle core (numpy and scipy.sparse run these stages on
    one thread); wall time also counts waiting for a busy machine.
    """
    times: dict[str, tuple[float, float]] = {}
    clock = (time.perf_counter(), time.process_time())

    def lap(name: str) -> None:
        nonlocal clock
        now = (time.perf_counter(), time.process_time())
        times[name] = (now[0] - clock[0], now[1] - clock[1])
        clock = now

    ann = annotation_matrix(inp.pairs, inp.ontology, inp.proteins)
    ancestors = inp.ontology.ancestor_matrix()
    lap("propagate")
    study = study_sets(inp.activations)
    lap("study_sets")
    result = enrich_features(study, ann.matrix, inp.ontology.namespace, ancestors, min_overlap=min_overlap)
    lap("enrich")
    return result, times


def run_goatools(inp: Inputs, n_features: int) -> float | None:
    """CPU seconds per feature of goatools' ``GOEnrichmentStudy.run_study`` (all namespaces, one population)."""
    try:
        from goatools.go_enrichment import GOEnrichmentStudy
        from goatools.obo_parser import GODag
    except ImportError:
        return None
    assoc: dict[str, set[str]] = {}
    for acc, term in inp.pairs:
        assoc.setdefault(acc, set()).add(inp.ontology.ids[term])
    study = study_sets(inp.activations[:, :n_features])
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        obo = Path(tmp) / "go.obo"
        inp.ontology.write_obo(obo)
        dag = GODag(str(obo), prt=None)
        goea = GOEnrichmentStudy(list(assoc), assoc, dag, propagate_counts=True, alpha=0.05, methods=["fdr_bh"],
                                 pvalcalc="fisher_scipy_stats", alternative="greater", log=None)
        t0 = time.process_time()
        for f in range(n_features):
            goea.run_study({inp.proteins[p] for p in study[f].indices}, prt=None)
        return (time.process_time() - t0) / n_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sae-engine bench enrich", description=__doc__.splitlines()[0])
    parser.add_argument("--proteins", type=int, default=16_000)
    parser.add_argument("--features", type=int, default=20_000)
    parser.add_argument("--go", default=os.environ.get("SAE_ENGINE_GO_SQLITE"),
                        help="GO.sqlite or .obo (default $SAE_ENGINE_GO_SQLITE; synthetic DAG when unset)")
    parser.add_argument("--terms", type=int, default=30_000, help="terms of the synthetic DAG (without --go)")
    parser.add_argument("--min-overlap", type=int, default=DEFAULT_MIN_OVERLAP)
    parser.add_argument("--goatools-features", type=int, default=20, help="features run through goatools (0: skip)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    args = parser.parse_args(argv)
    if args.proteins < 16 or args.features < 1 or args.terms < 100:
        parser.error("--proteins must be at least 16, --features at least 1 and --terms at least 100")
    if args.goatools_features > args.features:
        parser.error(f"--goatools-features {args.goatools_features} is more than --features {args.features}")
    info = machine_info("cpu", ("scipy", "goatools"))
    t0 = time.perf_counter()
    try:
        inp = make_inputs(args.proteins, args.features, args.go, n_terms=args.terms)
    except (OSError, ValueError) as err:
        print(f"sae-engine bench enrich: error: {args.go}: {err}", file=sys.stderr)
        return 2
    build = time.perf_counter() - t0
    result, times = run_ours(inp, args.min_overlap)
    wall, cpu = (sum(t[i] for t in times.values()) for i in (0, 1))
    study_sizes = np.diff(sp.csc_matrix(inp.activations).indptr)
    per_feature = run_goatools(inp, args.goatools_features) if args.goatools_features else None
    summary: dict[str, Any] = {
        "suite": "enrich", "machine": info, "go": args.go or "synthetic DAG", "terms": len(inp.ontology),
        "proteins": args.proteins, "direct_annotations": len(inp.pairs), "features": args.features,
        "study_size_min_median_max": [int(study_sizes.min()), int(np.median(study_sizes)), int(study_sizes.max())],
        "pairs_tested": len(result), "significant_q05": int((result.q_value <= 0.05).sum()),
        "min_overlap": args.min_overlap, "inputs_s": build,
        "stages": {name: {"wall_s": w, "cpu_s": c} for name, (w, c) in times.items()},
        "total_wall_s": wall, "total_cpu_s": cpu, "cpu_ms_per_feature": 1e3 * cpu / args.features,
        "goatools_cpu_ms_per_feature": None if per_feature is None else 1e3 * per_feature,
        "speedup_per_feature": None if per_feature is None else per_feature * args.features / cpu,
    }
    if args.json:
        print_json(summary)
        return 0
    print(machine_line(info))
    print(f"GO: {summary['go']} ({summary['terms']} terms); {args.proteins} proteins, {len(inp.pairs)} direct "
          f"annotations; {args.features} features, study sizes {study_sizes.min()}-{study_sizes.max()} "
          f"(median {int(np.median(study_sizes))}); inputs built in {build:.1f} s")
    print(f"ours: {len(result)} pairs tested (min overlap {args.min_overlap}), "
          f"{summary['significant_q05']} with q <= 0.05")
    for name, (w, c) in [*times.items(), ("total", (wall, cpu))]:
        print(f"  {name:<10} wall {w:7.2f} s  cpu {c:7.2f} s")
    print(f"  per feature: {summary['cpu_ms_per_feature']:.3f} ms cpu")
    if args.goatools_features:
        if per_feature is None:
            print("goatools: not installed (pip install 'sae-engine[bench]')")
        else:
            print(f"goatools: {1e3 * per_feature:.1f} ms cpu/feature over {args.goatools_features} features "
                  f"(about {per_feature * args.features:.0f} s for all {args.features}); "
                  f"ours is {summary['speedup_per_feature']:.0f}x faster per feature")
    return 0
