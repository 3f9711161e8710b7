"""pytest-benchmark entry for all-features GO enrichment: ``python -m pytest bench/test_bench_enrich.py``.

A small size (1,500 proteins x 500 features over a synthetic GO) so it runs in seconds; the
full-size table comes from ``sae-engine bench enrich``. The timed result is checked
against scipy's hypergeometric survival function on a sample of pairs.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import hypergeom

from sae_engine.go.annotations import annotation_matrix
from sae_engine.go.enrich import enrich_features, study_sets

from sae_engine.benchmarks import enrichment as eb


@pytest.fixture(scope="module")
def prepared():
    inp = eb.make_inputs(1_500, 500, None, seed=3)
    ann = annotation_matrix(inp.pairs, inp.ontology, inp.proteins)
    return inp, ann.matrix, inp.ontology.ancestor_matrix(), study_sets(inp.activations)


def test_enrich_all_features(benchmark, prepared) -> None:
    inp, annotations, ancestors, study = prepared
    result = benchmark(enrich_features, study, annotations, inp.ontology.namespace, ancestors)
    assert len(result) > 10_000
    sample = np.random.default_rng(0).choice(len(result), 2_000, replace=False)
    ref = hypergeom.sf(result.study_count[sample] - 1, result.pop_size[sample], result.pop_count[sample],
                       result.study_size[sample])
    np.testing.assert_allclose(result.p_value[sample], ref, rtol=1e-9)


def test_propagate_annotations(benchmark, prepared) -> None:
    inp = prepared[0]
    ann = benchmark(annotation_matrix, inp.pairs, inp.ontology, inp.proteins)
    assert ann.matrix.nnz > len(inp.pairs)
