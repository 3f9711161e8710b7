"""Evaluate families of units and the null families beside them, on one split and one set of labels."""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .controls import Residualizer, covariates, permutation_within_deciles, stratified_split
from .nulls import composition_units
from .units import ALPHA, DEFAULT_TOP_N, MAX_TERM, MAX_TERM_SHARE, MIN_F1, MIN_TERM, Labels, UnitResults, evaluate_units

N_COMPOSITION = 200
NULL_FLOOR = 0.05  # the most a label-free null family may pass
RANDOM_DIRECTIONS = "random_directions"


@dataclass
class Settings:
    """The protocol's knobs (defaults: the issue's)."""

    seed: int = 0
    top_n: int | None = DEFAULT_TOP_N
    alpha: float = ALPHA
    min_f1: float = MIN_F1
    min_term: int = MIN_TERM
    max_term: int = MAX_TERM
    max_term_share: float = MAX_TERM_SHARE
    n_composition: int = N_COMPOSITION


@dataclass
class Evaluation:
    """Results of every family and null family; ``discovery`` is the ``[P]`` split mask."""

    ids: list[str]
    discovery: np.ndarray
    settings: Settings
    families: dict[str, UnitResults] = field(default_factory=dict)
    nulls: dict[str, UnitResults] = field(default_factory=dict)
    random_directions_source: str = ""


def evaluate(families: dict[str, sp.spmatrix | np.ndarray], ids: list[str], sequences: list[str],
             annotations: sp.spmatrix, term_namespace: np.ndarray, ancestors: sp.spmatrix,
             settings: Settings | None = None, random_directions: sp.spmatrix | np.ndarray | None = None,
             log: Callable[[str], None] | None = None) -> Evaluation:
    """Evaluate each family and the nulls (see ``sae_engine.evaluation``).

    Args:
        families: name -> ``[P, U]`` per-protein activations, rows in the order of ``ids``.
        ids, sequences: the ``P`` proteins.
        annotations: ``[P, T]`` bool, propagated GO annotations of the proteins.
        term_namespace, ancestors: of the ontology (``[T]``, ``[T, T]``).
        random_directions: ``[P, D]`` per-protein activations of random directions in the
            activation space (``nulls.random_directions_in_store``); None: that null is not run
            (random mixtures of the families' own units would inherit their signal).
    """
    settings = settings or Settings()
    log = log or (lambda message: print(message, file=sys.stderr))
    if not families:
        raise ValueError("no family of units to evaluate")
    lengths = np.array([len(s) for s in sequences])
    discovery = stratified_split(lengths, settings.seed)
    covs = covariates(sequences)
    residualize = Residualizer(covs, discovery)
    labels = Labels.build(annotations, term_namespace, ancestors, discovery, settings.min_term, settings.max_term,
                          settings.max_term_share)
    result = Evaluation(list(ids), discovery, settings)

    def run(name: str, acts, which: Labels = labels) -> UnitResults:
        log(f"evaluating {name}: {acts.shape[1]} units")
        return evaluate_units(acts, which, residualize, settings.top_n, settings.alpha, settings.min_f1)

    for name, acts in families.items():
        result.families[name] = run(name, acts)
    if random_directions is not None:
        result.random_directions_source = "random directions in the activation store, pooled like the neurons"
        result.nulls[RANDOM_DIRECTIONS] = run("null random_directions", random_directions)
    else:
        result.random_directions_source = "not run: needs the activation store (--store, --layer)"
    result.nulls["composition"] = run("null composition",
                                      composition_units(covs, settings.n_composition, settings.seed + 2))
    for offset, (name, acts) in enumerate(families.items()):
        source = permutation_within_deciles(lengths, settings.seed + 3 + offset)
        permuted = labels.permuted(source, discovery, settings.min_term, settings.max_term, settings.max_term_share)
        result.nulls[f"permuted_labels:{name}"] = run(f"null permuted labels of {name}", acts, permuted)
    return result
