"""Discovery and held-out tests of a family of units, all units and terms at once.

A unit's score on a protein is its activation residualized on length and composition
(:mod:`.controls`), or ``-inf`` where the unit does not fire at all (activation <= 0): a unit
can only point at proteins it is active on.

Discovery (discovery proteins only): each unit's study set is its top-N proteins by score
(``top_n=None``: every protein it fires on). Every (unit, term) pair is tested with the
one-sided hypergeometric test of :mod:`sae_engine.go.enrich` against the namespace's background
(proteins with at least one annotation in it), over terms with ``min_term`` to ``max_term``
annotated background proteins; Benjamini-Hochberg runs per namespace over every unit x term
pair of the family (terms are also capped at 6 % of the background: see MAX_TERM_SHARE). A unit's term is its smallest-p pair among those with q <= alpha, and its
threshold the score that maximizes F1 between "score >= threshold" and "annotated with the
term" over the discovery background.

Held out (the other proteins; term and threshold fixed): F1 of the same rule, and the
enrichment of the held-out top-N for the term (Benjamini-Hochberg over the family's units
that have a term). A unit passes when both hold: F1 >= ``min_f1`` and q <= alpha.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..go.enrich import bh_log_q, enrich_features, hypergeom_log_sf
from ..go.ontology import NAMESPACES
from .controls import Residualizer

DEFAULT_TOP_N = 50
MIN_TERM, MAX_TERM = 5, 500
# Also at most this share of the namespace's discovery background: 500 is about 6 % of half the
# human proteome. In small samples a term covering a third of the background has F1 near 0.5
# for a unit that fires on everything, so broad terms would pass on size alone.
MAX_TERM_SHARE = 0.06
ALPHA = 0.05
MIN_F1 = 0.5
_EXPLAINED = 1e-9  # 1 - R² below this: the unit is a function of the covariates
_CHUNK_BYTES = 64 << 20  # dense [P, units] float64 per chunk of units


@dataclass(frozen=True)
class Labels:
    """Concept labels (GO terms, or a flat set such as Pfam families) of the evaluated proteins
    and what the tests derive from them.

    Attributes:
        annotations: ``[P, T]`` bool CSR, propagated; rows are the evaluated proteins.
        term_namespace: ``[T]`` int index into NAMESPACES.
        ancestors: ``[T, T]`` bool ancestor closure (``enrich_features`` flags most specific terms with it).
        in_background: ``[P, namespaces]`` bool: the protein has an annotation in the namespace.
        testable: ``[T]`` bool: terms with ``min_term..max_term`` annotated discovery background
            proteins, and at most ``max_term_share`` of that background.
        by_term: ``annotations`` as CSC, for gathering the columns of chosen terms.
        whole_background: every protein is in every namespace's background (a flat concept
            set: a protein without a label in the table has none of its concepts).
    """

    annotations: sp.csr_matrix
    term_namespace: np.ndarray
    ancestors: sp.csr_matrix
    in_background: np.ndarray
    testable: np.ndarray
    by_term: sp.csc_matrix
    whole_background: bool = False

    @classmethod
    def build(cls, annotations: sp.spmatrix, term_namespace: np.ndarray, ancestors: sp.spmatrix,
              discovery: np.ndarray, min_term: int = MIN_TERM, max_term: int = MAX_TERM,
              max_term_share: float = MAX_TERM_SHARE, whole_background: bool = False) -> Labels:
        ann = sp.csr_matrix(annotations, dtype=bool)
        n_terms = ann.shape[1]
        term_namespace = np.asarray(term_namespace)
        # GO's three namespaces; a flat concept set uses namespace 0 only
        n_namespaces = max(len(NAMESPACES), int(term_namespace.max()) + 1 if n_terms else 1)
        onehot = sp.csr_matrix((np.ones(n_terms, dtype=np.int32), (np.arange(n_terms), term_namespace)),
                               shape=(n_terms, n_namespaces))
        in_background = (ann.astype(np.int32) @ onehot).toarray() > 0
        if whole_background:
            in_background[:] = True
        discovery_count = np.asarray(ann[np.flatnonzero(discovery)].sum(axis=0)).ravel()
        background = in_background[discovery].sum(axis=0)[term_namespace]  # [T]
        testable = (discovery_count >= min_term) & (discovery_count <= np.minimum(max_term, max_term_share * background))
        return cls(ann, np.asarray(term_namespace), sp.csr_matrix(ancestors), in_background, testable, ann.tocsc(),
                   whole_background)

    def permuted(self, source: np.ndarray, discovery: np.ndarray, min_term: int = MIN_TERM, max_term: int = MAX_TERM,
                 max_term_share: float = MAX_TERM_SHARE) -> Labels:
        """The labels with protein ``i`` given the annotations of protein ``source[i]``."""
        return Labels.build(self.annotations[source], self.term_namespace, self.ancestors, discovery, min_term,
                            max_term, max_term_share, self.whole_background)


@dataclass(frozen=True)
class UnitResults:
    """Per unit (all ``[U]``): activation frequency (share of proteins it fires on), R² on the
    covariates, the discovery term (-1: none) with its log p and log q, the threshold and F1 on
    discovery, the held-out F1 and log q, and whether it passes."""

    frequency: np.ndarray
    r2: np.ndarray
    term: np.ndarray
    discovery_log_p: np.ndarray
    discovery_log_q: np.ndarray
    threshold: np.ndarray
    discovery_f1: np.ndarray
    heldout_f1: np.ndarray
    heldout_log_q: np.ndarray
    passes: np.ndarray

    def __len__(self) -> int:
        return int(self.term.size)


def _chunks(activations: sp.csr_matrix | np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """(unit columns, dense float64 ``[P, u]`` activations) in chunks of bounded memory."""
    n_proteins, n_units = activations.shape
    step = max(1, _CHUNK_BYTES // (8 * max(n_proteins, 1)))
    csc = sp.csc_matrix(activations) if sp.issparse(activations) else None
    for start in range(0, n_units, step):
        cols = slice(start, min(start + step, n_units))
        block = csc[:, cols].toarray() if csc is not None else activations[:, cols]
        yield cols, np.asarray(block, dtype=np.float64)


def _scores(raw: np.ndarray, residualize: Residualizer) -> tuple[np.ndarray, np.ndarray]:
    """(scores ``[P, u]``: residuals where the unit fires, -inf elsewhere; R² ``[u]``).

    A unit the covariates explain exactly (R² within 1e-9 of 1, e.g. a linear function of
    composition) has only rounding error left, which is not random (it grows with the values):
    such a unit fires nowhere.
    """
    residual, r2 = residualize(raw)
    explained = r2 >= 1.0 - _EXPLAINED
    return np.where((raw > 0) & ~explained, residual, -np.inf), r2


def top_sets(score: np.ndarray, top_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, units) of each unit's top-``top_n`` rows by score (finite scores only; None: all finite)."""
    finite = np.isfinite(score)
    if top_n is None:
        rows, units = np.nonzero(finite)
        return rows, units
    order = np.argsort(-score, axis=0, kind="stable")[:top_n]  # [min(top_n, P), u]
    picked = np.take_along_axis(finite, order, axis=0)
    units = np.broadcast_to(np.arange(score.shape[1]), order.shape)
    return order[picked], units[picked]


def best_thresholds(score: np.ndarray, label: np.ndarray, in_background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the threshold maximizing F1 of ``score >= threshold`` against ``label`` over
    the background rows, and that F1. All ``[p, u]`` -> ``[u]``; a column without finite scores
    gets threshold +inf and F1 0. Only cuts between distinct scores are candidates."""
    order = np.argsort(-score, axis=0, kind="stable")
    s = np.take_along_axis(score, order, axis=0)
    finite = np.isfinite(s)
    bg = np.take_along_axis(in_background, order, axis=0) & finite
    positive = label & in_background
    tp = np.cumsum(np.take_along_axis(positive, order, axis=0) & finite, axis=0)
    predicted = np.cumsum(bg, axis=0)
    f1 = 2.0 * tp / np.maximum(predicted + positive.sum(axis=0), 1)
    boundary = finite & np.vstack([s[1:] < s[:-1], np.ones((1, s.shape[1]), dtype=bool)])
    f1 = np.where(boundary, f1, -1.0)
    cut = np.argmax(f1, axis=0)
    columns = np.arange(s.shape[1])
    best = f1[cut, columns]
    return np.where(best >= 0, s[cut, columns], np.inf), np.maximum(best, 0.0)


def f1_at(score: np.ndarray, threshold: np.ndarray, label: np.ndarray, in_background: np.ndarray) -> np.ndarray:
    """``[u]`` F1 of ``score >= threshold`` (per column) against ``label`` over the background rows."""
    predicted = (score >= threshold) & in_background
    positive = label & in_background
    tp = (predicted & positive).sum(axis=0)
    return 2.0 * tp / np.maximum(predicted.sum(axis=0) + positive.sum(axis=0), 1)


def _best_terms(study: sp.csr_matrix, labels: Labels, rows: np.ndarray, alpha: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Discovery: per unit, (term or -1, log p, log q) of its smallest-p pair with q <= alpha."""
    n_units = study.shape[0]
    ann = labels.annotations[rows]
    found = []
    for ns in range(labels.in_background.shape[1]):
        terms = labels.testable & (labels.term_namespace == ns)
        if not terms.any():
            continue
        result = enrich_features(study, ann, labels.term_namespace, labels.ancestors, min_overlap=1,
                                 alpha=alpha, terms=terms)
        if not len(result):
            continue
        # enrich_features corrects over the pairs it tested (overlap >= 1); the family is every
        # unit x term pair of the namespace, and untested pairs have p = 1, so BH over the whole
        # family is BH over the tested ones scaled by (family size / tested).
        log_q = np.minimum(result.log_q + math.log(n_units * int(terms.sum()) / len(result)), 0.0)
        keep = log_q <= math.log(alpha)
        found.append((result.feature[keep], result.term[keep], result.log_p[keep], log_q[keep]))
    term = np.full(n_units, -1, dtype=np.int64)
    log_p = np.zeros(n_units)
    log_q = np.zeros(n_units)
    if found:
        unit, t, p, q = (np.concatenate(parts) for parts in zip(*found))
        order = np.lexsort((t, p, unit))  # by unit, then p, then term index
        first = order[np.r_[True, unit[order][1:] != unit[order][:-1]]] if order.size else order
        term[unit[first]], log_p[unit[first]], log_q[unit[first]] = t[first], p[first], q[first]
    return term, log_p, log_q


def _heldout_enrichment(study: sp.csr_matrix, term: np.ndarray, labels: Labels, rows: np.ndarray) -> np.ndarray:
    """``[U]`` natural-log p of each unit's held-out study set for its term (0 for units without one)."""
    log_p = np.zeros(term.size)
    units = np.flatnonzero(term >= 0)
    if not units.size:
        return log_p
    ann = labels.by_term[:, term[units]].toarray()[rows]  # [P_h, U']
    ns = labels.term_namespace[term[units]]
    bg = labels.in_background[rows][:, ns]  # [P_h, U']
    members = study[units].toarray().T  # [P_h, U']
    k = (members & ann).sum(axis=0)
    N = (members & bg).sum(axis=0)
    n = ann.sum(axis=0)
    M = labels.in_background[rows].sum(axis=0)[ns]
    log_p[units] = hypergeom_log_sf(k, M, n, N)
    return log_p


def evaluate_units(activations: sp.spmatrix | np.ndarray, labels: Labels, residualize: Residualizer,
                   top_n: int | None = DEFAULT_TOP_N, alpha: float = ALPHA, min_f1: float = MIN_F1) -> UnitResults:
    """Evaluate every unit of a family (see the module docstring).

    Args:
        activations: ``[P, U]`` per-protein activations (e.g. the max over residues), rows in the
            order of ``labels`` and ``residualize``.
        labels: the proteins' GO labels.
        residualize: the length and composition control, fitted on discovery proteins.
        top_n: study set size; None: every protein the unit fires on.
    """
    discovery = residualize.discovery
    d_rows, h_rows = np.flatnonzero(discovery), np.flatnonzero(~discovery)
    n_units = activations.shape[1]
    frequency, r2 = np.zeros(n_units), np.zeros(n_units)
    d_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for cols, raw in _chunks(activations):
        score, r2[cols] = _scores(raw, residualize)
        frequency[cols] = (raw > 0).mean(axis=0)
        rows, units = top_sets(score[d_rows], top_n)
        d_pairs.append((units + cols.start, rows))
    unit, row = (np.concatenate(parts) for parts in zip(*d_pairs))
    study = sp.csr_matrix((np.ones(unit.size, dtype=bool), (unit, row)), shape=(n_units, d_rows.size))
    term, d_log_p, d_log_q = _best_terms(study, labels, d_rows, alpha)

    threshold = np.full(n_units, np.inf)
    d_f1, h_f1 = np.zeros(n_units), np.zeros(n_units)
    h_pairs: list[tuple[np.ndarray, np.ndarray]] = []
    for cols, raw in _chunks(activations):
        units = np.flatnonzero(term[cols] >= 0)
        if not units.size:
            continue
        score = _scores(raw[:, units], residualize)[0]
        t = term[cols][units]
        label = labels.by_term[:, t].toarray()  # [P, u]
        bg = labels.in_background[:, labels.term_namespace[t]]
        where = units + cols.start
        threshold[where], d_f1[where] = best_thresholds(score[d_rows], label[d_rows], bg[d_rows])
        h_f1[where] = f1_at(score[h_rows], threshold[where], label[h_rows], bg[h_rows])
        rows, picked = top_sets(score[h_rows], top_n)
        h_pairs.append((where[picked], rows))
    h_log_q = np.zeros(n_units)
    has_term = term >= 0
    if h_pairs:
        unit, row = (np.concatenate(parts) for parts in zip(*h_pairs))
        h_study = sp.csr_matrix((np.ones(unit.size, dtype=bool), (unit, row)), shape=(n_units, h_rows.size))
        h_log_p = _heldout_enrichment(h_study, term, labels, h_rows)
        h_log_q[has_term] = bh_log_q(h_log_p[has_term])
    passes = has_term & (h_f1 >= min_f1) & (h_log_q <= math.log(alpha))
    return UnitResults(frequency, r2, term, d_log_p, d_log_q, threshold, d_f1, h_f1, h_log_q, passes)
