"""Vectorized enrichment statistics, checked against scipy, mpmath, goatools and brute force."""
from __future__ import annotations

import argparse
import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.stats import hypergeom

from sae_engine.go.annotations import CountedWarnings, annotation_matrix, read_pairs
from sae_engine.go.enrich import COLUMNS, bh_log_q, enrich_features, hypergeom_log_sf, register, study_sets
from sae_engine.go.ontology import NAMESPACES, read_obo

DATA = Path(__file__).parent / "data" / "go"


def _random_cases(rng: np.random.Generator, size: int, max_m: int) -> tuple[np.ndarray, ...]:
    M = rng.integers(1, max_m, size)
    n = (rng.random(size) * (M + 1)).astype(np.int64)
    N = (rng.random(size) ** 3 * (M + 1)).astype(np.int64)  # mostly small study sets, like features
    k = (rng.random(size) * (np.minimum(n, N) + 2)).astype(np.int64)
    return k, M, n, N


@pytest.mark.parametrize("max_m", [30, 2_000, 60_000])
def test_hypergeom_sf_matches_scipy(max_m: int) -> None:
    k, M, n, N = _random_cases(np.random.default_rng(max_m), 10_000, max_m)
    ours = np.exp(hypergeom_log_sf(k, M, n, N))
    ref = hypergeom.sf(k - 1, M, n, N)
    finite = ref > 1e-300
    assert finite.sum() > 5_000
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-9, atol=0)
    assert np.all(ours[~finite] < 1e-290)


def test_hypergeom_sf_edges_of_the_support() -> None:
    # k at or below max(0, n + N - M) is certain; above min(n, N) impossible.
    k = np.array([0, 3, 4, 6, 5, 1])
    M = np.array([10, 10, 10, 10, 10, 0])
    n = np.array([4, 7, 7, 5, 5, 0])
    N = np.array([3, 6, 6, 5, 5, 0])
    expected = [0.0, 0.0, math.log(hypergeom.sf(3, 10, 7, 6)), -np.inf, math.log(hypergeom.pmf(5, 10, 5, 5)), -np.inf]
    np.testing.assert_allclose(hypergeom_log_sf(k, M, n, N), expected, rtol=1e-12)
    with pytest.raises(ValueError):
        hypergeom_log_sf(np.array([1]), np.array([5]), np.array([6]), np.array([1]))


def test_hypergeom_log_sf_far_below_double_range() -> None:
    # p far under 1e-308: a whole family in a 20k-protein background, and very large backgrounds.
    k = np.array([300, 250, 1_000, 800, 2_000, 150])
    M = np.array([20_000, 20_000, 200_000, 16_000, 500_000, 1_000_000])
    n = np.array([300, 400, 1_500, 5_000, 2_000, 150])
    N = np.array([300, 260, 1_200, 800, 2_000, 150])
    ours = hypergeom_log_sf(k, M, n, N) / math.log(10)
    assert np.all(ours < -300) and np.all(np.isfinite(ours))
    assert np.all(hypergeom.sf(k - 1, M, n, N) == 0)  # what a linear-space p-value would say
    np.testing.assert_allclose(ours, hypergeom.logsf(k - 1, M, n, N) / math.log(10), rtol=1e-10)
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    for ki, Mi, ni, Ni, log10 in zip(k.tolist(), M.tolist(), n.tolist(), N.tolist(), ours.tolist()):
        exact = mpmath.fsum(mpmath.binomial(ni, x) * mpmath.binomial(Mi - ni, Ni - x)
                            for x in range(ki, min(ni, Ni) + 1)) / mpmath.binomial(Mi, Ni)
        assert abs(float(mpmath.log10(exact)) - log10) < 1e-9 * abs(log10)


def _bh_reference(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p, kind="stable")
    m = p.size
    q = np.empty(m)
    running = 1.0
    for rank in range(m, 0, -1):
        running = min(running, p[order[rank - 1]] * m / rank)
        q[order[rank - 1]] = running
    return q


def test_benjamini_hochberg_global_and_per_group() -> None:
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.random(500) ** 4, np.full(20, 0.01), [1.0, 1.0]])  # ties included
    groups = rng.integers(0, 7, p.size)
    np.testing.assert_allclose(np.exp(bh_log_q(np.log(p))), _bh_reference(p), rtol=1e-12)
    per_group = np.exp(bh_log_q(np.log(p), groups))
    for g in range(7):
        np.testing.assert_allclose(per_group[groups == g], _bh_reference(p[groups == g]), rtol=1e-12)
    # Underflowed p-values keep their order in log space.
    log_q = bh_log_q(np.array([-2000.0, -1000.0, -3000.0, math.log(0.5)]))
    np.testing.assert_allclose(log_q, [-2000.0 + math.log(2), -1000 + math.log(4 / 3), -3000.0 + math.log(4),
                                       math.log(0.5 * 4 / 4)], rtol=1e-12)


def test_study_sets_threshold_and_top_n() -> None:
    rng = np.random.default_rng(2)
    dense = np.where(rng.random((300, 40)) < 0.2, rng.integers(0, 5, (300, 40)).astype(float), 0.0)
    dense[:, 3] = 0.0  # a dead feature
    for threshold, top_n in [(0.0, None), (0.0, 10), (2.5, 7), (0.0, 1)]:
        sets = study_sets(sp.csr_matrix(dense), threshold, top_n)
        assert sets.shape == (40, 300) and sets.dtype == bool
        for f in range(40):
            above = [p for p in np.argsort(-dense[:, f], kind="stable") if dense[p, f] > threshold]
            expected = set(above if top_n is None else above[:top_n])  # ties: lower protein index first
            assert set(sets[f].indices.tolist()) == expected


@pytest.fixture(scope="module")
def fixture_inputs():
    """Ontology, population, propagated annotations (is_a) and the study sets of the fixtures."""
    go = read_obo(DATA / "go_subset.obo")
    population = (DATA / "population.txt").read_text().split()
    pairs = read_pairs(DATA / "annotations.tsv", go, CountedWarnings())
    features: dict[str, list[str]] = {}
    for line in (DATA / "study.tsv").read_text().splitlines():
        name, acc = line.split("\t")
        features.setdefault(name, []).append(acc)
    row = {acc: i for i, acc in enumerate(population)}
    study = sp.lil_matrix((len(features), len(population)), dtype=bool)
    for f, members in enumerate(features.values()):
        for acc in members:
            study[f, row[acc]] = True
    return go, population, pairs, list(features), features, study.tocsr()


@pytest.mark.parametrize("min_overlap", [1, 2, 4])
def test_enrich_features_matches_brute_force(fixture_inputs, min_overlap: int) -> None:
    go, population, pairs, names, _, study = fixture_inputs
    ann = annotation_matrix(pairs, go, population)
    res = enrich_features(study, ann.matrix, go.namespace, go.ancestor_matrix(), min_overlap=min_overlap)
    A = ann.matrix.toarray()
    S = study.toarray()
    tested = set()
    for f in range(S.shape[0]):
        for t in range(A.shape[1]):
            ns = go.namespace[t]
            background = A[:, go.namespace == ns].any(axis=1)
            k = int((S[f] & A[:, t]).sum())
            if k >= min_overlap:
                tested.add((f, t, k, int((S[f] & background).sum()), int(A[:, t].sum()), int(background.sum())))
    got = set(zip(res.feature.tolist(), res.term.tolist(), res.study_count.tolist(), res.study_size.tolist(),
                  res.pop_count.tolist(), res.pop_size.tolist()))
    assert got == tested
    ref_p = hypergeom.sf(res.study_count - 1, res.pop_size, res.pop_count, res.study_size)
    np.testing.assert_allclose(res.p_value, ref_p, rtol=1e-9)
    np.testing.assert_allclose(res.q_value, _bh_reference(ref_p), rtol=1e-9)
    np.testing.assert_allclose(res.fold_enrichment,
                               (res.study_count / res.study_size) / (res.pop_count / res.pop_size), rtol=1e-12)
    # Sorted by feature, then p.
    assert np.all(np.diff(res.feature) >= 0)
    assert all(np.all(np.diff(res.log_p[res.feature == f]) >= 0) for f in range(len(names)))


def test_most_specific_flags_only_the_deepest_significant_terms(fixture_inputs) -> None:
    go, population, pairs, names, _, study = fixture_inputs
    ann = annotation_matrix(pairs, go, population)
    closure = go.ancestor_matrix()
    res = enrich_features(study, ann.matrix, go.namespace, closure, alpha=0.05)
    significant = res.q_value <= 0.05
    for f in range(len(names)):
        sig_terms = set(res.term[(res.feature == f) & significant].tolist())
        for i in np.flatnonzero(res.feature == f):
            t = int(res.term[i])
            descendants = set(closure[:, t].nonzero()[0].tolist()) - {t}
            assert res.most_specific[i] == (t in sig_terms and not descendants & sig_terms)
    olfactory = names.index("olfactory_feature")
    top = res.term[(res.feature == olfactory) & res.most_specific]
    assert go.index["GO:0004984"] in top.tolist()  # olfactory receptor activity
    assert go.index["GO:0003674"] not in res.term[res.most_specific].tolist()  # never the MF root


@pytest.mark.parametrize("relations", [("is_a",), ("is_a", "part_of")])
def test_p_values_equal_goatools(fixture_inputs, relations: tuple[str, ...]) -> None:
    pytest.importorskip("goatools")
    from goatools.go_enrichment import GOEnrichmentStudy
    from goatools.obo_parser import GODag

    go, population, pairs, names, features, study = fixture_inputs
    ann = annotation_matrix(pairs, go, population, relations)
    res = enrich_features(study, ann.matrix, go.namespace, go.ancestor_matrix(relations), min_overlap=2)
    with contextlib.redirect_stdout(io.StringIO()):
        dag = GODag(str(DATA / "go_subset.obo"), optional_attrs={"relationship"}, prt=None)
    compared = 0
    for ns_index, ns in enumerate(NAMESPACES):
        direct: dict[str, set[str]] = {}
        for acc, term in pairs:
            if go.namespace[term] == ns_index:
                direct.setdefault(acc, set()).add(go.ids[term])
        background = [acc for acc in population if acc in direct]
        kws = {"relationships": {"part_of"}} if "part_of" in relations else {}
        goea = GOEnrichmentStudy(background, {a: set(s) for a, s in direct.items()}, dag, propagate_counts=True,
                                 alpha=0.05, methods=["fdr_bh"], pvalcalc="fisher_scipy_stats",
                                 alternative="greater", log=None, **kws)
        for f, name in enumerate(names):
            theirs = {r.GO: r for r in goea.run_study(set(features[name]) & set(background), prt=None)
                      if r.study_count >= 2}
            mine = {go.ids[t]: i for t, i in zip(res.term.tolist(), range(len(res)))
                    if res.feature[i] == f and go.namespace[t] == ns_index}
            assert set(theirs) == set(mine), (name, ns)
            for go_id, rec in theirs.items():
                i = mine[go_id]
                assert (rec.study_count, rec.study_n, rec.pop_count, rec.pop_n) == (
                    res.study_count[i], res.study_size[i], res.pop_count[i], res.pop_size[i])
                assert res.p_value[i] == pytest.approx(rec.p_uncorrected, rel=1e-9)
                compared += 1
    assert compared > 200


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sae-engine")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    header, *rows = path.read_text().splitlines()
    return [dict(zip(header.split("\t"), row.split("\t"))) for row in rows]


def test_cli_end_to_end_obo_and_sqlite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["enrich", "--study", str(DATA / "study.tsv"), "--population", str(DATA / "population.txt"),
            "--annotations", str(DATA / "annotations.tsv")]
    assert _cli(base + ["--ontology", str(DATA / "go_subset.obo"), "--out", str(tmp_path / "a.tsv")]) == 0
    assert _cli(base + ["--ontology", str(DATA / "go_subset.sqlite"), "--out", str(tmp_path / "b.tsv")]) == 0
    assert (tmp_path / "a.tsv").read_text() == (tmp_path / "b.tsv").read_text()
    err = capsys.readouterr().err
    assert "obsolete GO terms skipped" in err and "secondary GO ids mapped" in err
    assert (tmp_path / "a.tsv").read_text().splitlines()[0].split("\t") == list(COLUMNS)
    rows = _read_tsv(tmp_path / "a.tsv")
    best = {}
    for row in rows:
        best.setdefault(row["feature"], row)  # first row of each feature has its smallest p
    assert best["olfactory_feature"]["go_name"] in {"olfactory receptor activity", "G protein-coupled receptor activity",
                                                    "sensory perception of smell"}
    assert float(best["ribosome_feature"]["q_value"]) < 1e-10
    assert all(float(r["q_value"]) > 0.05 for r in rows if r["feature"] == "random_feature")

    assert _cli(base + ["--ontology", str(DATA / "go_subset.obo"), "--out", str(tmp_path / "mf.tsv"),
                        "--namespace", "MF", "--min-overlap", "5", "--max-q", "0.01"]) == 0
    mf = _read_tsv(tmp_path / "mf.tsv")
    assert mf and all(r["namespace"] == "MF" and int(r["study_count"]) >= 5 and float(r["q_value"]) <= 0.01 for r in mf)


def test_cli_errors_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = tmp_path / "study.tsv"
    study.write_text("f1\tNOT_A_PROTEIN\nf1\t" + (DATA / "population.txt").read_text().split()[0] + "\n")
    argv = ["enrich", "--study", str(study), "--population", str(DATA / "population.txt"), "--annotations",
            str(DATA / "annotations.tsv"), "--out", str(tmp_path / "o.tsv"), "--ontology", str(DATA / "go_subset.obo")]
    assert _cli(argv) == 0
    assert "study accessions not in the population ignored: 1 (first: " in capsys.readouterr().err
    study.write_text("f1\tP1\nf1 P2\n")
    assert _cli(argv) == 2
    assert f"{study}:2: expected 'feature<TAB>accession'" in capsys.readouterr().err
    assert _cli(argv[:-1] + [str(tmp_path / "none.obo")]) == 2
    assert "none.obo" in capsys.readouterr().err
