"""Headline numbers of an evaluation, the matched-count comparison, and the files written."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..go.ontology import NAMESPACES, Ontology
from .pipeline import NULL_FLOOR, RANDOM_DICTIONARY, Evaluation, is_baseline
from .units import UnitResults

TABLE_COLUMNS = ("unit", "frequency", "r2", "go_id", "go_name", "namespace", "discovery_p", "discovery_q",
                 "threshold", "discovery_f1", "heldout_f1", "heldout_q", "passes")


def family_summary(results: UnitResults, ontology: Ontology | None = None, top_terms: int = 10) -> dict:
    """units, passing, pass_share, distinct_terms (among passing units), median_f1 (held-out,
    over passing units; None when none pass), units with a discovery term, median R², and the
    most frequent passing terms."""
    passing = results.passes
    terms, counts = np.unique(results.term[passing], return_counts=True)
    top = np.argsort(-counts, kind="stable")[:top_terms]
    r2 = results.r2[np.isfinite(results.r2)]
    return {
        "units": len(results),
        "passing": int(passing.sum()),
        "pass_share": float(passing.mean()) if len(results) else 0.0,
        "distinct_terms": int(terms.size),
        "median_f1": float(np.median(results.heldout_f1[passing])) if passing.any() else None,
        "with_discovery_term": int((results.term >= 0).sum()),
        "median_r2": float(np.median(r2)) if r2.size else None,
        "top_terms": [[_term_id(ontology, int(terms[i])), int(counts[i])] for i in top],
    }


def _term_id(ontology: Ontology | None, term: int) -> str:
    return ontology.ids[term] if ontology is not None else str(term)


def summarize(evaluation: Evaluation, ontology: Ontology | None = None) -> dict:
    """The content of ``evaluation.json``: settings, every family and null family, the floor.

    The false-pass floor is the best pass share among the nulls that know nothing but length,
    composition or shuffled labels (composition, permuted labels); it must stay within
    ``floor_limit``. Random directions and random dictionaries are reported beside them and
    enter ``best_null`` (what each family is compared with), not the floor: a random direction
    of the activation space knows what that space knows (ESM2's, protein families included), so
    it is the baseline of a random dictionary rather than a false pass. ``random_dictionary``
    gives, per family that has one, its distinct concepts and pass share against a random
    dictionary of its own size.
    """
    settings = evaluation.settings
    families = {name: family_summary(r, ontology) for name, r in evaluation.families.items()}
    nulls = {name: family_summary(r, ontology) for name, r in evaluation.nulls.items()}
    label_free = {name: s for name, s in nulls.items() if not is_baseline(name)}
    floor_null = max(label_free, key=lambda name: label_free[name]["pass_share"]) if label_free else None
    floor = label_free[floor_null]["pass_share"] if floor_null else 0.0
    best_null = max(nulls, key=lambda name: nulls[name]["pass_share"]) if nulls else None
    best = nulls[best_null]["pass_share"] if best_null else 0.0
    return {
        "proteins": len(evaluation.ids),
        "discovery_proteins": int(evaluation.discovery.sum()),
        "heldout_proteins": int((~evaluation.discovery).sum()),
        "settings": {"seed": settings.seed, "top_n": settings.top_n, "alpha": settings.alpha,
                     "min_f1": settings.min_f1, "term_size": [settings.min_term, settings.max_term],
                     "max_term_share": settings.max_term_share,
                     "composition_units": settings.n_composition,
                     "random_directions": evaluation.random_directions_source},
        "families": families,
        "nulls": nulls,
        "false_pass_floor": floor,
        "false_pass_null": floor_null,
        "floor_limit": NULL_FLOOR,
        "nulls_within_limit": floor <= NULL_FLOOR,
        "best_null": best_null,
        "best_null_pass_share": best,
        "pass_share_minus_best_null": {name: s["pass_share"] - best for name, s in families.items()},
        "random_dictionary": {name: _against(families[name], nulls[f"{RANDOM_DICTIONARY}:{name}"])
                              for name in families if f"{RANDOM_DICTIONARY}:{name}" in nulls},
    }


def _against(family: dict, baseline: dict) -> dict:
    """A family beside a baseline of its own size: both counts and the ratio of distinct concepts."""
    ratio = family["distinct_terms"] / baseline["distinct_terms"] if baseline["distinct_terms"] else None
    return {"units": family["units"], "distinct_terms": family["distinct_terms"], "pass_share": family["pass_share"],
            "baseline_distinct_terms": baseline["distinct_terms"], "baseline_pass_share": baseline["pass_share"],
            "distinct_terms_ratio": ratio}


def matched_subsets(frequency_a: np.ndarray, frequency_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equal-size subsets of two families matched by activation frequency.

    Every unit of the smaller family is paired, in order of frequency, with the unused unit of
    the larger family whose frequency is nearest (ties: the lower one). Returns the unit indices
    ``(of a, of b)``, pairwise matched.
    """
    swap = frequency_a.size > frequency_b.size
    small, large = (frequency_b, frequency_a) if swap else (frequency_a, frequency_b)
    large_order = np.argsort(large, kind="stable")
    pool = list(large[large_order])  # sorted frequencies still free, and their unit ids
    ids = list(large_order)
    picked_small, picked_large = [], []
    for unit in np.argsort(small, kind="stable"):
        if not pool:
            break
        at = int(np.searchsorted(pool, small[unit]))
        if at == len(pool) or (at > 0 and small[unit] - pool[at - 1] <= pool[at] - small[unit]):
            at -= 1
        picked_small.append(int(unit))
        picked_large.append(int(ids.pop(at)))
        pool.pop(at)
    small_ids, large_ids = np.array(picked_small, dtype=np.int64), np.array(picked_large, dtype=np.int64)
    return (large_ids, small_ids) if swap else (small_ids, large_ids)


def matched_comparison(a: UnitResults, b: UnitResults) -> dict:
    """Pass share and distinct terms of ``a`` and ``b`` on frequency-matched equal-size subsets."""
    ia, ib = matched_subsets(a.frequency, b.frequency)

    def part(r: UnitResults, idx: np.ndarray) -> dict:
        passing = r.passes[idx]
        return {"pass_share": float(passing.mean()) if idx.size else 0.0,
                "distinct_terms": int(np.unique(r.term[idx][passing]).size),
                "median_frequency": float(np.median(r.frequency[idx])) if idx.size else None}

    return {"units_each": int(ia.size), "a": part(a, ia), "b": part(b, ib)}


def random_subset_comparison(a: UnitResults, b: UnitResults, draws: int = 5, seed: int = 0) -> dict:
    """Pass share and distinct terms of ``a`` and ``b`` at equal counts, by random subsets.

    The larger family is cut to the smaller one's size by ``draws`` seeded random subsets
    (uniform, without replacement); the smaller family enters whole. Each side gets the mean
    and standard deviation over the draws (0 for the whole family) and the values per draw.
    Unlike :func:`matched_comparison`, which pairs units of similar activation frequency (and so
    picks a sparse family's densest units), this compares what a random unit set of each size holds.
    """
    size = min(len(a), len(b))
    rng = np.random.default_rng(seed)

    def side(r: UnitResults) -> dict:
        subsets = ([np.sort(rng.choice(len(r), size=size, replace=False)) for _ in range(draws)]
                   if len(r) > size else [np.arange(len(r))])
        share = np.array([r.passes[idx].mean() if idx.size else 0.0 for idx in subsets])
        terms = np.array([np.unique(r.term[idx][r.passes[idx]]).size for idx in subsets])
        return {"pass_share_mean": float(share.mean()), "pass_share_sd": float(share.std()),
                "distinct_terms_mean": float(terms.mean()), "distinct_terms_sd": float(terms.std()),
                "pass_share": share.tolist(), "distinct_terms": terms.tolist()}

    return {"units_each": int(size), "draws": draws, "seed": seed, "a": side(a), "b": side(b)}


def _format(value: float) -> str:
    return f"{value:.6g}"


def write_unit_table(path: Path, results: UnitResults, ontology: Ontology) -> None:
    """One TSV row per unit (:data:`TABLE_COLUMNS`), written atomically.

    ``ontology`` is a GO :class:`Ontology` or a :class:`.concepts.ConceptSet` (ids, names,
    namespace, namespaces); a flat concept set names its columns ``concept_id``, ``concept_name``.
    """
    namespaces = getattr(ontology, "namespaces", NAMESPACES)
    columns = TABLE_COLUMNS if not getattr(ontology, "flat", False) else tuple(
        c.replace("go_", "concept_") for c in TABLE_COLUMNS)
    lines = ["\t".join(columns)]
    for u in range(len(results)):
        t = int(results.term[u])
        has = t >= 0
        term_cells = [ontology.ids[t], ontology.names[t], namespaces[ontology.namespace[t]]] if has else ["", "", ""]
        numbers = ([_format(math.exp(results.discovery_log_p[u])), _format(math.exp(results.discovery_log_q[u])),
                    _format(results.threshold[u]), _format(results.discovery_f1[u]), _format(results.heldout_f1[u]),
                    _format(math.exp(results.heldout_log_q[u]))] if has else [""] * 6)
        lines.append("\t".join([str(u), _format(results.frequency[u]), _format(results.r2[u]), *term_cells,
                                *numbers, str(int(results.passes[u]))]))
    _write_atomic(path, "\n".join(lines) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_evaluation(out_dir: Path, evaluation: Evaluation, ontology: Ontology) -> dict:
    """``out_dir/evaluation.json`` and ``out_dir/units/<family>.tsv`` (nulls too); returns the summary."""
    summary = summarize(evaluation, ontology)
    out_dir = Path(out_dir)
    (out_dir / "units").mkdir(parents=True, exist_ok=True)
    for name, results in evaluation.families.items():
        write_unit_table(out_dir / "units" / f"{table_name(name)}.tsv", results, ontology)
    for name, results in evaluation.nulls.items():
        write_unit_table(out_dir / "units" / f"{table_name(name, null=True)}.tsv", results, ontology)
    _write_atomic(out_dir / "evaluation.json", json.dumps(summary, indent=2))
    return summary


def table_name(family: str, null: bool = False) -> str:
    """File stem of a family's unit table: null families get a ``null_`` prefix; ':' becomes '_'."""
    return ("null_" if null else "") + family.replace(":", "_")


def headline(summary: dict) -> list[str]:
    """Printable lines: one per family and null family."""
    best = summary["best_null_pass_share"]
    lines = [f"{'family':<34}{'units':>7}{'pass':>7}{'share':>8}{'terms':>7}{'med F1':>8}{'- best null':>12}"]
    for group in ("families", "nulls"):
        for name, s in summary[group].items():
            f1 = f"{s['median_f1']:.2f}" if s["median_f1"] is not None else "-"
            diff = f"{100 * (s['pass_share'] - best):+.1f}%" if group == "families" else ""
            label = name if group == "families" else f"null: {name}"
            lines.append(f"{label:<34}{s['units']:>7}{s['passing']:>7}{100 * s['pass_share']:>7.1f}%"
                         f"{s['distinct_terms']:>7}{f1:>8}{diff:>12}")
    state = "within" if summary["nulls_within_limit"] else "ABOVE"
    lines.append(f"false-pass floor (composition and permuted-label nulls; highest: {summary['false_pass_null']}): "
                 f"{100 * summary['false_pass_floor']:.1f}%, {state} the {100 * summary['floor_limit']:.0f}% limit")
    lines.append(f"best null: {summary['best_null']} at {100 * best:.1f}%")
    for name, c in summary.get("random_dictionary", {}).items():
        ratio = f"{c['distinct_terms_ratio']:.2f}x" if c["distinct_terms_ratio"] is not None else "-"
        lines.append(f"{name} against a random dictionary of its size ({c['units']} units): distinct terms "
                     f"{c['distinct_terms']} vs {c['baseline_distinct_terms']} ({ratio}), pass "
                     f"{100 * c['pass_share']:.1f}% vs {100 * c['baseline_pass_share']:.1f}%")
    return lines
