"""GO over-representation for every SAE feature at once.

For feature ``f`` and term ``t`` in namespace ``s``::

    M = pop_size[s]      annotated proteins of the population in namespace s (the background)
    n = pop_count[t]     background proteins annotated to t (after propagation)
    N = study_size[f, s] proteins of f's study set that are in the background of s
    k = study_count[f,t] of those, annotated to t

and the one-sided p-value is ``P(X >= k)`` for ``X ~ Hypergeometric(M, n, N)`` (the one-sided
Fisher exact test). Backgrounds are per namespace: a protein with no MF annotation tells
nothing about MF terms, so it is in neither M nor N for MF terms.

All ``k`` come from one sparse product, ``study [F, P] @ annotations [P, T]``; the p-values of
all pairs with ``k >= min_overlap`` are computed as arrays (see :func:`hypergeom_log_sf`).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.special import betaln, gammaln

from ..atomic import atomic_path
from .annotations import AnnotationError, CountedWarnings, annotation_matrix, read_annotations
from .ontology import NAMESPACES, Ontology, OntologyError, load_ontology

DEFAULT_MIN_OVERLAP = 2
DEFAULT_ALPHA = 0.05
DEFAULT_TOP_N = 200
_SERIES_RTOL = 1e-17  # stop a tail series once what is left is below this fraction of its sum
_FEATURE_CHUNK = 4096  # features per sparse product: bounds the memory of the [F, T] overlap counts
_LN10 = math.log(10.0)


_TABLE_MAX_M = 1 << 15  # log-factorial lookups stay within 1e-10 of exact log p up to this population size


def _log_comb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log C(a, b) for 0 <= b <= a, via betaln (accurate where gammaln differences cancel)."""
    return -np.log1p(a) - betaln(a - b + 1.0, b + 1.0)


def hypergeom_log_pmf(x: np.ndarray, M: np.ndarray, n: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Natural log of ``P(X = x)``, ``X ~ Hypergeometric(M, n, N)``, for x inside the support.

    Populations up to 32,768 use a table of log-factorials (nine lookups a value; the table's
    rounding, about 1e-11 a lookup at that size, is the only error); larger ones use betaln.
    """
    x, M, n, N = (np.asarray(v, dtype=np.int64) for v in (x, M, n, N))
    top = int(M.max(initial=0))
    if top <= _TABLE_MAX_M:
        lf = gammaln(np.arange(top + 1, dtype=np.float64) + 1.0)
        return (lf[n] - lf[x] - lf[n - x]) + (lf[M - n] - lf[N - x] - lf[M - n - N + x]) - (lf[M] - lf[N] - lf[M - N])
    x, M, n, N = (v.astype(np.float64) for v in (x, M, n, N))
    return _log_comb(n, x) + _log_comb(M - n, N - x) - _log_comb(M, N)


def _tail_series(x: np.ndarray, M: np.ndarray, n: np.ndarray, N: np.ndarray, upward: bool) -> np.ndarray:
    """``sum_j pmf(x + j) / pmf(x)`` (upward) or ``sum_j pmf(x - j) / pmf(x)`` (downward), j >= 0.

    Callers start on the side of the mode where the terms only shrink, so every ratio is < 1,
    nothing overflows, and all terms are positive (no cancellation). The ratios themselves
    shrink along the walk, so the rest of the series after a term ``t`` with next ratio ``r``
    is at most ``t r / (1 - r)``: a pair stops once that bound is negligible. Finished pairs
    get a zero term and leave the working arrays once they are a third of them, so the work
    follows the number of terms that matter without compacting at every step.
    """
    total = np.empty(x.size, dtype=np.float64)
    live = np.arange(x.size)
    x, n, N = (v.astype(np.float64) for v in (x, n, N))
    rest = M.astype(np.float64) - n - N  # M - n - N + x: "bad" items left undrawn, >= 0 on the support
    term = np.ones(x.size, dtype=np.float64)
    acc = np.ones(x.size, dtype=np.float64)
    going = np.ones(x.size, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):  # finished pairs may walk off the support
        while live.size:
            if upward:
                ratio = (n - x) * (N - x) / ((x + 1.0) * (rest + x + 1.0))
                x += 1.0
            else:
                ratio = x * (rest + x) / ((n - x + 1.0) * (N - x + 1.0))
                x -= 1.0
            term = np.where(going, term * ratio, 0.0)
            acc += term
            going &= term * ratio > _SERIES_RTOL * acc * (1.0 - ratio)
            n_going = int(np.count_nonzero(going))
            if n_going < 0.67 * live.size:
                done = ~going
                total[live[done]] = acc[done]
                live, x, n, N, rest, term, acc = (v[going] for v in (live, x, n, N, rest, term, acc))
                going = np.ones(n_going, dtype=bool)
    return total


def hypergeom_log_sf(k: np.ndarray, M: np.ndarray, n: np.ndarray, N: np.ndarray) -> np.ndarray:
    """Natural log of ``P(X >= k)`` for ``X ~ Hypergeometric(M, n, N)``, elementwise.

    Equals ``log(scipy.stats.hypergeom.sf(k - 1, M, n, N))`` and stays finite far below the
    smallest double (p < 1e-308), so tiny p-values keep their order.

    Above the mode the tail is ``pmf(k) * sum_j pmf(k+j)/pmf(k)``: one log-pmf (betaln) and a
    series of ratios. At or below the mode ``P(X >= k) >= ~1/2``, so ``log1p(-P(X <= k-1))`` with
    the lower tail summed the same way downward loses nothing.

    Args:
        k, M, n, N: integer arrays (broadcast together): overlap, population size, successes in
            the population, draws (study size).
    Returns:
        float64 array of the broadcast shape; 0 where ``k`` is at or below the support, ``-inf``
        above it.
    """
    k, M, n, N = (a.astype(np.int64).ravel() for a in np.broadcast_arrays(*(np.asarray(v) for v in (k, M, n, N))))
    shape = np.broadcast_shapes(*(np.shape(v) for v in (k, M, n, N)))
    if np.any((M < 0) | (n < 0) | (N < 0) | (n > M) | (N > M)):
        raise ValueError("hypergeometric parameters need 0 <= n <= M and 0 <= N <= M")
    out = np.zeros(k.size, dtype=np.float64)
    low, high = np.maximum(0, n + N - M), np.minimum(n, N)
    out[k > high] = -np.inf
    inside = (k > low) & (k <= high)
    mode = (n + 1) * (N + 1) // (M + 2)
    up = np.flatnonzero(inside & (k > mode))
    if up.size:
        ku, Mu, nu, Nu = k[up], M[up], n[up], N[up]
        out[up] = hypergeom_log_pmf(ku, Mu, nu, Nu) + np.log(_tail_series(ku, Mu, nu, Nu, upward=True))
    down = np.flatnonzero(inside & (k <= mode))
    if down.size:
        kd, Md, nd, Nd = k[down] - 1, M[down], n[down], N[down]
        log_cdf = hypergeom_log_pmf(kd, Md, nd, Nd) + np.log(_tail_series(kd, Md, nd, Nd, upward=False))
        out[down] = np.log1p(-np.exp(log_cdf))
    return out.reshape(shape)


def bh_log_q(log_p: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values, in natural log, over all tests or within each group.

    ``q_(i) = min_{j >= i} p_(j) m / j`` (capped at 1), computed on log p so that p-values
    that underflow still rank correctly.

    Args:
        log_p: ``[R]`` natural-log p-values.
        groups: optional ``[R]`` integer group labels (e.g. feature index): one family per group.
    Returns:
        ``[R]`` natural-log q-values (<= 0).
    """
    log_p = np.asarray(log_p, dtype=np.float64)
    if log_p.size == 0:
        return log_p.copy()
    out = np.empty(log_p.size, dtype=np.float64)
    if groups is None:
        order = np.argsort(log_p)
        value = log_p[order] + math.log(log_p.size) - np.log(np.arange(1, log_p.size + 1))
        out[order] = np.minimum(np.minimum.accumulate(value[::-1])[::-1], 0.0)
        return out
    groups = np.asarray(groups)
    order = np.lexsort((log_p, groups))
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, g.size])
    rank = np.arange(g.size) - np.repeat(starts, sizes) + 1
    value = log_p[order] + np.log(np.repeat(sizes, sizes)) - np.log(rank)
    # Reverse cumulative minimum inside each group, exactly: replace values by their global rank
    # and shift each group's ranks below all earlier ones (in reversed order), so a single
    # running minimum never reaches across a group boundary.
    by_value = np.argsort(value, kind="stable")
    value_rank = np.empty(value.size, dtype=np.int64)
    value_rank[by_value] = np.arange(value.size)
    segment = np.repeat(np.arange(starts.size), sizes)
    shift = (starts.size - 1 - segment) * value.size
    running = np.minimum.accumulate((value_rank - shift)[::-1])[::-1] + shift
    out[order] = np.minimum(value[by_value][running], 0.0)
    return out


def study_sets(activations: sp.spmatrix, threshold: float = 0.0, top_n: int | None = DEFAULT_TOP_N) -> sp.csr_matrix:
    """Per-feature study sets from protein-level activations.

    A protein is in feature f's set when its activation is ``> threshold``, keeping at most the
    ``top_n`` largest (ties broken by protein order). The default (active at all, top 200)
    follows what SAE features are: a TopK/ReLU code is 0 where the feature is off, and for
    broad features the strongest 200 proteins (about 1% of a proteome) say what the feature
    is about, where all 5,000 of its weak hits would only resemble the background.

    Args:
        activations: ``[P, F]`` sparse (or dense) protein x feature activations, e.g. the max
            over residues of each protein.
        threshold: activation a protein must exceed.
        top_n: cap on the set size; ``None`` keeps every protein above the threshold.
    Returns:
        ``[F, P]`` boolean CSR: row f is feature f's study set.
    """
    acts = sp.csc_matrix(activations)
    acts.sum_duplicates()
    n_proteins, n_features = acts.shape
    feature = np.repeat(np.arange(n_features), np.diff(acts.indptr))
    keep = acts.data > threshold
    protein, feature, value = acts.indices[keep], feature[keep], acts.data[keep]
    if top_n is not None:
        order = np.lexsort((protein, -value, feature))
        protein, feature = protein[order], feature[order]
        first = np.searchsorted(feature, feature, side="left")
        within = np.arange(feature.size) - first < top_n
        protein, feature = protein[within], feature[within]
    return sp.csr_matrix((np.ones(protein.size, dtype=bool), (feature, protein)), shape=(n_features, n_proteins))


@dataclass(frozen=True)
class Enrichment:
    """One row per tested (feature, term) pair, sorted by feature, then p-value.

    Attributes (all ``[R]``): feature and term indices; the four hypergeometric counts;
    fold enrichment ``(k/N)/(n/M)``; natural-log p and q; ``most_specific``: significant
    (q <= alpha) with no significant descendant term for the same feature.
    """

    feature: np.ndarray
    term: np.ndarray
    study_count: np.ndarray
    study_size: np.ndarray
    pop_count: np.ndarray
    pop_size: np.ndarray
    fold_enrichment: np.ndarray
    log_p: np.ndarray
    log_q: np.ndarray
    most_specific: np.ndarray

    def __len__(self) -> int:
        return int(self.feature.size)

    @property
    def p_value(self) -> np.ndarray:
        return np.exp(self.log_p)

    @property
    def q_value(self) -> np.ndarray:
        return np.exp(self.log_q)

    @property
    def log10_p(self) -> np.ndarray:
        return self.log_p / _LN10


def enrich_features(study: sp.spmatrix, annotations: sp.spmatrix, term_namespace: np.ndarray,
                    ancestors: sp.spmatrix, min_overlap: int = DEFAULT_MIN_OVERLAP,
                    alpha: float = DEFAULT_ALPHA, per_feature_fdr: bool = False,
                    terms: np.ndarray | None = None) -> Enrichment:
    """Test every (feature, term) pair with overlap ``>= min_overlap``.

    Args:
        study: ``[F, P]`` boolean, feature x population protein (see :func:`study_sets`).
        annotations: ``[P, T]`` boolean, propagated (see :func:`annotation_matrix`). The
            background of namespace s is the proteins with at least one annotation in s.
        term_namespace: ``[T]`` int, index into :data:`NAMESPACES`.
        ancestors: ``[T, T]`` boolean ``[term, ancestor]`` closure along the relations used for
            propagation; it defines "descendant" for ``most_specific``.
        min_overlap: smallest study count tested. Pairs below it are not tested and are not in
            the multiple-testing family.
        alpha: q-value threshold for ``most_specific``.
        per_feature_fdr: Benjamini-Hochberg within each feature instead of across all pairs.
        terms: optional ``[T]`` boolean mask of the terms to test (e.g. one namespace).
    """
    study = sp.csr_matrix(study, dtype=np.int32)
    ann = sp.csr_matrix(annotations, dtype=np.int32)
    n_terms = ann.shape[1]
    if study.shape[1] != ann.shape[0] or term_namespace.shape != (n_terms,) or ancestors.shape != (n_terms, n_terms):
        raise ValueError(f"shape mismatch: study {study.shape}, annotations {ann.shape}, "
                         f"term_namespace {term_namespace.shape}, ancestors {ancestors.shape}")
    namespace_onehot = sp.csr_matrix((np.ones(n_terms, dtype=np.int32), (np.arange(n_terms), term_namespace)),
                                     shape=(n_terms, len(NAMESPACES)))
    in_background = ((ann @ namespace_onehot) > 0).astype(np.int32)  # [P, 3]
    pop_size = np.asarray(in_background.sum(axis=0)).ravel()  # [3]
    pop_count = np.asarray(ann.sum(axis=0)).ravel()  # [T]
    study_size = (study @ in_background).toarray()  # [F, 3]
    if terms is not None:
        ann = ann @ sp.diags(np.asarray(terms, dtype=np.int32), dtype=np.int32)
        ann.eliminate_zeros()
    ann.sort_indices()

    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, study.shape[0], _FEATURE_CHUNK):
        overlap = (study[start:start + _FEATURE_CHUNK] @ ann).tocsr()  # [chunk, T] counts k
        feature = np.repeat(np.arange(start, start + overlap.shape[0]), np.diff(overlap.indptr))
        keep = overlap.data >= min_overlap
        feature, term, k = feature[keep], overlap.indices[keep].astype(np.int64), overlap.data[keep].astype(np.int64)
        ns = term_namespace[term]
        N, n, M = study_size[feature, ns], pop_count[term], pop_size[ns]
        log_p = hypergeom_log_sf(k, M, n, N)
        # int32 halves the memory of the tens of millions of rows a proteome-wide run keeps.
        parts.append((*(v.astype(np.int32) for v in (feature, term, k, N, n, M)), log_p))
    if not parts:
        parts.append((*(np.zeros(0, np.int32),) * 6, np.zeros(0)))
    feature, term, k, N, n, M, log_p = (np.concatenate(c) for c in zip(*parts))
    log_q = bh_log_q(log_p, feature if per_feature_fdr else None)

    # most_specific: a significant term none of whose strict descendants is significant for the
    # same feature. Only significant pairs can qualify, so only they are looked up.
    sig_pairs = np.flatnonzero(log_q <= math.log(alpha))
    sig_feature, sig_term = feature[sig_pairs].astype(np.int64), term[sig_pairs].astype(np.int64)
    sig = sp.csr_matrix((np.ones(sig_pairs.size, dtype=np.int32), (sig_feature, sig_term)),
                        shape=(study.shape[0], n_terms))
    strict_ancestors = sp.csr_matrix(ancestors, dtype=np.int32) - sp.identity(n_terms, dtype=np.int32, format="csr")
    strict_ancestors.eliminate_zeros()
    below = (sig @ strict_ancestors).tocoo()  # [F, T]: count of significant strict descendants
    covered = np.isin(sig_feature * n_terms + sig_term, below.row.astype(np.int64) * n_terms + below.col)
    most_specific = np.zeros(log_p.size, dtype=bool)
    most_specific[sig_pairs[~covered]] = True

    # Pairs come out of the products grouped by feature; order by p inside each feature.
    by_p = np.argsort(log_p, kind="stable")
    order = by_p[np.argsort(feature[by_p], kind="stable")]
    with np.errstate(divide="ignore", invalid="ignore"):
        fold = (k / N.astype(np.float64)) / (n / M.astype(np.float64))
    return Enrichment(feature[order], term[order], k[order], N[order], n[order], M[order],
                      fold[order], log_p[order], log_q[order], most_specific[order])


# ----------------------------------------------------------------------------- command line

class InputError(ValueError):
    """A user input problem; the message names the file and line."""


def read_population(path: str | Path, warnings: CountedWarnings) -> list[str]:
    """Accessions, one a line (blank and ``#`` lines skipped); repeats counted and kept once."""
    path = Path(path)
    seen: dict[str, None] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read population: {error}") from error
    for number, line in enumerate(lines, start=1):
        accession = line.strip()
        if not accession or accession.startswith("#"):
            continue
        if any(ch.isspace() for ch in accession):
            raise InputError(f"{path}:{number}: expected one accession per line, got {line[:80]!r}")
        if accession in seen:
            warnings.add("repeated population accessions", f"{path}:{number}: {accession}")
        seen[accession] = None
    if not seen:
        raise InputError(f"{path}: no accessions")
    return list(seen)


def read_study_sets(path: str | Path, population: dict[str, int],
                    warnings: CountedWarnings) -> tuple[list[str], sp.csr_matrix]:
    """Feature names (first-appearance order) and the ``[F, P]`` boolean study matrix from
    ``feature<TAB>accession`` lines. Accessions outside the population are counted and left out."""
    path = Path(path)
    features: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read study sets: {error}") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cols_ = line.split("\t")
        if len(cols_) != 2 or not cols_[0].strip() or not cols_[1].strip():
            raise InputError(f"{path}:{number}: expected 'feature<TAB>accession', got {line[:80]!r}")
        name, accession = cols_[0].strip(), cols_[1].strip()
        row = features.setdefault(name, len(features))
        col = population.get(accession)
        if col is None:
            warnings.add("study accessions not in the population ignored", f"{path}:{number}: {accession}")
            continue
        rows.append(row)
        cols.append(col)
    if not features:
        raise InputError(f"{path}: no study sets")
    matrix = sp.csr_matrix((np.ones(len(rows), dtype=np.int32), (rows, cols)), shape=(len(features), len(population)))
    repeats = int(matrix.sum() - (matrix > 0).sum())
    warnings.add("repeated (feature, accession) lines counted once", str(path), repeats)
    return list(features), (matrix > 0).tocsr()


COLUMNS = ("feature", "go_id", "go_name", "namespace", "study_count", "study_size", "pop_count", "pop_size",
           "fold_enrichment", "p_value", "q_value", "log10_p", "most_specific")


def write_table(path: str | Path, result: Enrichment, features: list[str], ontology: Ontology,
                max_q: float = 1.0) -> int:
    """Write rows with q <= ``max_q`` as TSV (header + :data:`COLUMNS`); returns the row count.

    p and q are written as doubles (0 below 1e-308); log10_p keeps the order beyond that.
    """
    rows = np.flatnonzero(result.log_q <= math.log(max_q)) if max_q < 1.0 else np.arange(len(result))
    p, q, log10_p = result.p_value, result.q_value, result.log10_p
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        out.write("\t".join(COLUMNS) + "\n")
        for i in rows.tolist():
            t = int(result.term[i])
            out.write(f"{features[result.feature[i]]}\t{ontology.ids[t]}\t{ontology.names[t]}\t"
                      f"{NAMESPACES[ontology.namespace[t]]}\t{result.study_count[i]}\t{result.study_size[i]}\t"
                      f"{result.pop_count[i]}\t{result.pop_size[i]}\t{result.fold_enrichment[i]:.6g}\t"
                      f"{p[i]:.6g}\t{q[i]:.6g}\t{log10_p[i]:.6f}\t{int(result.most_specific[i])}\n")
    return int(rows.size)


def run(args: argparse.Namespace) -> int:
    """The ``enrich`` command: read inputs, test all pairs, write the table; returns the exit code."""
    warnings = CountedWarnings()
    if args.min_overlap < 1:
        print(f"sae-engine enrich: error: --min-overlap must be >= 1, got {args.min_overlap}", file=sys.stderr)
        return 2
    relations = ("is_a", "part_of") if args.part_of else ("is_a",)
    try:
        ontology = load_ontology(args.ontology)
        population = read_population(args.population, warnings)
        pairs = read_annotations(args.annotations, ontology, warnings)
        annotated = annotation_matrix(pairs, ontology, population, relations, warnings)
        features, study = read_study_sets(args.study, annotated.index, warnings)
    except (OntologyError, AnnotationError, InputError) as error:
        print(f"sae-engine enrich: error: {error}", file=sys.stderr)
        return 2
    unannotated = int(((study.getnnz(axis=0) > 0) & (annotated.matrix.getnnz(axis=1) == 0)).sum())
    warnings.add("study proteins without annotation (outside every background)", str(args.study), unannotated)
    terms = None if args.namespace == "all" else ontology.namespace == NAMESPACES.index(args.namespace)
    result = enrich_features(study, annotated.matrix, ontology.namespace, ontology.ancestor_matrix(relations),
                             min_overlap=args.min_overlap, alpha=args.alpha,
                             per_feature_fdr=args.fdr == "feature", terms=terms)
    written = write_table(args.out, result, features, ontology, args.max_q)
    for message in warnings.messages():
        print(f"sae-engine enrich: warning: {message}", file=sys.stderr)
    n_sig = int((result.log_q <= math.log(args.alpha)).sum())
    print(f"{len(features)} features, {len(population)} population proteins; {len(result)} pairs tested, "
          f"{n_sig} with q <= {args.alpha} ({int(result.most_specific.sum())} most specific); "
          f"{written} rows written to {args.out}", file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``enrich`` subcommand to the ``sae-engine`` parser."""
    p = commands.add_parser("enrich", help="GO over-representation of many study sets (features) at once",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="TSV, one 'feature<TAB>accession' a line")
    p.add_argument("--population", required=True, help="one accession a line: the population")
    p.add_argument("--annotations", required=True, help="GAF 2.x, or 'accession<TAB>GO id' lines")
    p.add_argument("--ontology", required=True, help="GO as .obo, or Bioconductor's GO.sqlite")
    p.add_argument("--out", required=True, help="output TSV")
    p.add_argument("--namespace", choices=[*NAMESPACES, "all"], default="all", help="terms to test (default all)")
    p.add_argument("--min-overlap", type=int, default=DEFAULT_MIN_OVERLAP,
                   help=f"smallest study count tested (default {DEFAULT_MIN_OVERLAP})")
    p.add_argument("--part-of", action="store_true", help="propagate along part_of as well as is_a")
    p.add_argument("--fdr", choices=["all", "feature"], default="all",
                   help="Benjamini-Hochberg across all tested pairs (default) or within each feature")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"q threshold for the most_specific flag (default {DEFAULT_ALPHA})")
    p.add_argument("--max-q", type=float, default=1.0, help="write only rows with q <= this (default: all)")
    p.set_defaults(run=run)
