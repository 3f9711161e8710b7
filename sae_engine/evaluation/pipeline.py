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


RANDOM_DICTIONARY = "random_dictionary"  # null name prefix: "random_dictionary:<family>"


def is_baseline(null: str) -> bool:
    """Random directions and random dictionaries: baselines that know the activation space,
    reported beside the label-free nulls but not part of the false-pass floor."""
    return null == RANDOM_DIRECTIONS or null.startswith(RANDOM_DICTIONARY + ":")


class Protocol:
    """One split, one length-and-composition fit and one set of labels: every family judged by it.

    Everything here is a function of (proteins, sequences, labels, settings), so families
    evaluated in separate calls (a study evaluates each SAE as it is trained) are judged on the
    same split and the same controls as if they had been evaluated together.
    """

    def __init__(self, sequences: list[str], annotations: sp.spmatrix, term_namespace: np.ndarray,
                 ancestors: sp.spmatrix, settings: Settings | None = None, flat: bool = False) -> None:
        """sequences: the ``P`` proteins; annotations ``[P, T]`` bool; term_namespace ``[T]``; ancestors
        ``[T, T]``; flat: a concept set without an ontology, whose background is every protein."""
        self.settings = s = settings or Settings()
        self.lengths = np.array([len(q) for q in sequences])
        self.discovery = stratified_split(self.lengths, s.seed)
        self.covariates = covariates(sequences)
        self.residualize = Residualizer(self.covariates, self.discovery)
        self.labels = Labels.build(annotations, term_namespace, ancestors, self.discovery, s.min_term, s.max_term,
                                   s.max_term_share, whole_background=flat)

    def units(self, activations: sp.spmatrix | np.ndarray, labels: Labels | None = None) -> UnitResults:
        """``[P, U]`` activations -> the held-out test of every unit (see :mod:`.units`)."""
        s = self.settings
        return evaluate_units(activations, labels or self.labels, self.residualize, s.top_n, s.alpha, s.min_f1)

    def permuted_labels(self, activations: sp.spmatrix | np.ndarray, offset: int) -> UnitResults:
        """The units against labels permuted within length deciles (seed ``settings.seed + 3 + offset``)."""
        s = self.settings
        source = permutation_within_deciles(self.lengths, s.seed + 3 + offset)
        permuted = self.labels.permuted(source, self.discovery, s.min_term, s.max_term, s.max_term_share)
        return self.units(activations, permuted)

    def composition(self) -> UnitResults:
        """The composition-unit null (``settings.n_composition`` units)."""
        s = self.settings
        return self.units(composition_units(self.covariates, s.n_composition, s.seed + 2))


def evaluate(families: dict[str, sp.spmatrix | np.ndarray], ids: list[str], sequences: list[str],
             annotations: sp.spmatrix, term_namespace: np.ndarray, ancestors: sp.spmatrix,
             settings: Settings | None = None, random_directions: sp.spmatrix | np.ndarray | None = None,
             log: Callable[[str], None] | None = None,
             random_dictionaries: dict[str, sp.spmatrix | np.ndarray] | None = None, flat: bool = False) -> Evaluation:
    """Evaluate each family and the nulls (see ``sae_engine.evaluation``).

    Args:
        families: name -> ``[P, U]`` per-protein activations, rows in the order of ``ids``.
        ids, sequences: the ``P`` proteins.
        annotations: ``[P, T]`` bool, labels of the proteins (propagated GO annotations, or a
            flat concept set: see :mod:`.concepts`).
        term_namespace, ancestors: of the concepts (``[T]``, ``[T, T]``).
        random_directions: ``[P, D]`` per-protein activations of random directions in the
            activation space (``nulls.random_directions_in_store``); None: that null is not run
            (random mixtures of the families' own units would inherit their signal).
        random_dictionaries: family name -> ``[P, U_family]`` activations of a random dictionary
            of that family's own size, pooled like it (``nulls.random_dictionary_in_store``);
            each is reported as the null ``random_dictionary:<family>``.
        flat: the labels are a flat concept set (no ontology): every protein is in the background.
    """
    settings = settings or Settings()
    log = log or (lambda message: print(message, file=sys.stderr))
    if not families:
        raise ValueError("no family of units to evaluate")
    unknown = sorted(set(random_dictionaries or {}) - set(families))
    if unknown:
        raise ValueError(f"random dictionaries of unknown families {unknown}")
    protocol = Protocol(sequences, annotations, term_namespace, ancestors, settings, flat)
    result = Evaluation(list(ids), protocol.discovery, settings)

    def run(name: str, acts) -> UnitResults:
        log(f"evaluating {name}: {acts.shape[1]} units")
        return protocol.units(acts)

    for name, acts in families.items():
        result.families[name] = run(name, acts)
    if random_directions is not None:
        result.random_directions_source = "random directions in the activation store, pooled like the neurons"
        result.nulls[RANDOM_DIRECTIONS] = run("null random_directions", random_directions)
    else:
        result.random_directions_source = "not run: needs the activation store (--store, --layer)"
    for name, acts in (random_dictionaries or {}).items():
        result.nulls[f"{RANDOM_DICTIONARY}:{name}"] = run(f"null random dictionary of {name}'s size", acts)
    log("evaluating null composition")
    result.nulls["composition"] = protocol.composition()
    for offset, (name, acts) in enumerate(families.items()):
        log(f"evaluating null permuted labels of {name}")
        result.nulls[f"permuted_labels:{name}"] = protocol.permuted_labels(acts, offset)
    return result
