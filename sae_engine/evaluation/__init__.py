"""Does a family of units (SAE features, neurons, ...) capture biology? Held out, controlled, calibrated.

``sae-engine evaluate --units NAME=PATH ... --out DIR``:

1. Split: proteins into discovery and held-out halves, seeded, stratified by length decile.
2. Controls: each unit's per-protein activation is residualized on log length and the 20
   amino-acid fractions (fit on discovery, applied to held-out); each unit's R² is reported.
3. Discovery: each unit's top-N proteins (or all it fires on) against every GO term, one-sided
   hypergeometric, per-namespace backgrounds, terms of 5-500 annotated proteins, BH per
   namespace; the unit's best term and its F1-maximizing threshold.
4. Held out: with term and threshold fixed, a unit passes when its F1 >= 0.5 and its held-out
   top-N is enriched for the term (q <= 0.05).
5. Nulls, evaluated by the same code: composition units and labels permuted within length
   deciles (their pass share is the false-pass floor, <= 5 %), and random directions of the
   activation space (the baseline of a random dictionary; see ``summary.summarize``).

Modules: :mod:`.controls` (split, covariates, residuals), :mod:`.units` (the tests),
:mod:`.nulls`, :mod:`.pipeline` (families and nulls together), :mod:`.summary` (headline,
matched counts, files), :mod:`.inputs` (reading and checking input).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .inputs import EvaluationInputError
from .pipeline import Evaluation, Settings, evaluate
from .summary import headline, matched_comparison, summarize, write_evaluation
from .units import DEFAULT_TOP_N, UnitResults

__all__ = ["Evaluation", "EvaluationInputError", "Settings", "UnitResults", "evaluate", "evaluate_files",
           "headline", "matched_comparison", "summarize", "write_evaluation"]


def evaluate_files(units: list[str], out: Path, *, fasta: list[Path], annotations: Path, ontology: Path,
                   store: Path | None = None, layer: int | None = None, settings: Settings | None = None) -> dict:
    """Read and check every input, evaluate, then write ``out``; returns the summary.

    Nothing is written unless every input is valid.
    """
    from .inputs import load_families, load_labels, load_random_directions, load_sequences

    settings = settings or Settings()
    if (store is None) != (layer is None):
        raise EvaluationInputError("--store and --layer go together")
    ids, families = load_families(units)
    sequences = load_sequences(fasta, ids)
    labels = load_labels(annotations, ontology, ids)
    directions = load_random_directions(store, layer, ids, settings.seed + 1) if store is not None else None
    for message in labels.warnings:
        print(f"sae-engine evaluate: warning: {message}", file=sys.stderr)
    result = evaluate(families, ids, sequences, labels.annotations, labels.ontology.namespace, labels.ancestors,
                      settings, random_directions=directions)
    return write_evaluation(out, result, labels.ontology)


def _run(args: argparse.Namespace) -> int:
    from ..esm.prepare import data_dir

    if args.top_n is not None and args.top_n < 1:
        print(f"sae-engine evaluate: error: --top-n must be >= 1, got {args.top_n}", file=sys.stderr)
        return 2
    explicit = (args.fasta, args.annotations, args.ontology)
    if any(explicit) and not all(explicit):
        print("sae-engine evaluate: error: --fasta, --annotations and --ontology go together "
              "(or use --data-dir)", file=sys.stderr)
        return 2
    if all(explicit):
        fasta, annotations, ontology = [Path(args.fasta)], Path(args.annotations), Path(args.ontology)
    else:
        root = data_dir(args.data_dir)
        fasta = [root / "human.fasta", root / "swissprot.fasta"]
        annotations, ontology = root / "go_annotations.tsv", root / "go.sqlite"
    settings = Settings(seed=args.seed, top_n=None if args.all_active else args.top_n)
    try:
        summary = evaluate_files(args.units, Path(args.out), fasta=fasta, annotations=annotations, ontology=ontology,
                                 store=Path(args.store) if args.store else None, layer=args.layer, settings=settings)
    except EvaluationInputError as error:
        print(f"sae-engine evaluate: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(headline(summary)))
    print(f"-> {Path(args.out) / 'evaluation.json'} and {Path(args.out) / 'units'}/")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sae-engine evaluate``."""
    p = commands.add_parser("evaluate", help="held-out, length- and composition-controlled GO evaluation of unit families, with nulls",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a family of units: per-protein activations written by `sae-engine features` (repeatable)")
    p.add_argument("--data-dir", help="prepared data folder (default: see `sae-engine data prepare`)")
    p.add_argument("--fasta", help="protein sequences (instead of --data-dir)")
    p.add_argument("--annotations", help="GO annotations: GAF or accession<TAB>GO id (instead of --data-dir)")
    p.add_argument("--ontology", help="GO as .obo or GO.sqlite (instead of --data-dir)")
    p.add_argument("--store", help="activation store of the units: random directions are drawn in its space")
    p.add_argument("--layer", type=int, help="layer of --store")
    p.add_argument("--out", required=True, help="output folder (evaluation.json, units/*.tsv)")
    p.add_argument("--seed", type=int, default=0, help="split and null seed (default 0)")
    p.add_argument("--top-n", type=int, default=DEFAULT_TOP_N, help=f"study set size (default {DEFAULT_TOP_N})")
    p.add_argument("--all-active", action="store_true", help="study sets: every protein a unit fires on (not the top N)")
    p.set_defaults(run=_run)
