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
   activation space (the baseline of a random dictionary; see ``summary.summarize``), also as
   a random dictionary of each family's own size (``--random-dictionaries``).

Concepts: GO (annotations with an ontology), or any protein-to-label table without one (a flat
concept set: Pfam families, ...; ``--annotations TABLE`` without ``--ontology``, or
``--concepts pfam`` with a prepared data folder). See :mod:`.concepts`.

Modules: :mod:`.controls` (split, covariates, residuals), :mod:`.units` (the tests),
:mod:`.nulls`, :mod:`.pipeline` (families and nulls together), :mod:`.summary` (headline,
matched counts, files), :mod:`.concepts` (GO and flat concept sets), :mod:`.inputs` (reading
and checking input), :mod:`.features` (per-protein activations).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .inputs import EvaluationInputError
from .pipeline import Evaluation, Settings, evaluate
from .summary import headline, matched_comparison, random_subset_comparison, summarize, write_evaluation
from .units import DEFAULT_TOP_N, UnitResults

__all__ = ["Evaluation", "EvaluationInputError", "Settings", "UnitResults", "evaluate", "evaluate_files",
           "headline", "matched_comparison", "random_subset_comparison", "summarize", "write_evaluation"]


def evaluate_files(units: list[str], out: Path, *, fasta: list[Path], annotations: Path, ontology: Path | None,
                   store: Path | None = None, layer: int | None = None, settings: Settings | None = None,
                   random_dictionaries: bool = False, concepts_name: str | None = None) -> dict:
    """Read and check every input, evaluate, then write ``out``; returns the summary.

    ``ontology`` None: ``annotations`` is a flat concept set (``accession<TAB>label``). With
    ``random_dictionaries`` (needs ``store``), each family is also compared with a random
    dictionary of its own size in the store's space. Nothing is written unless every input is valid.
    """
    from .concepts import ConceptError, flat_concepts
    from .inputs import load_families, load_labels, load_random_directions, load_random_dictionaries, load_sequences

    settings = settings or Settings()
    if (store is None) != (layer is None):
        raise EvaluationInputError("--store and --layer go together")
    if random_dictionaries and store is None:
        raise EvaluationInputError("--random-dictionaries needs the activation store (--store, --layer)")
    ids, families = load_families(units)
    sequences = load_sequences(fasta, ids)
    if ontology is not None:
        labels = load_labels(annotations, ontology, ids)
        concepts, warnings = labels.ontology, labels.warnings
        matrix, namespace, ancestors = labels.annotations, labels.ontology.namespace, labels.ancestors
    else:
        try:
            concepts = flat_concepts(annotations, ids, concepts_name)
        except ConceptError as error:
            raise EvaluationInputError(str(error)) from error
        warnings = list(concepts.warnings)
        matrix, namespace, ancestors = concepts.annotations, concepts.namespace, concepts.ancestors
    directions = load_random_directions(store, layer, ids, settings.seed + 1) if store is not None else None
    dictionaries = (load_random_dictionaries(store, layer, ids, {n: f.shape[1] for n, f in families.items()},
                                             settings.seed + 1) if random_dictionaries else None)
    for message in warnings:
        print(f"sae-engine evaluate: warning: {message}", file=sys.stderr)
    result = evaluate(families, ids, sequences, matrix, namespace, ancestors, settings, random_directions=directions,
                      random_dictionaries=dictionaries, flat=ontology is None)
    return write_evaluation(out, result, concepts)


def _run(args: argparse.Namespace) -> int:
    from ..esm.prepare import data_dir

    if args.top_n is not None and args.top_n < 1:
        print(f"sae-engine evaluate: error: --top-n must be >= 1, got {args.top_n}", file=sys.stderr)
        return 2
    if args.ontology and not args.annotations:
        print("sae-engine evaluate: error: --ontology needs --annotations", file=sys.stderr)
        return 2
    if bool(args.fasta) != bool(args.annotations):
        print("sae-engine evaluate: error: --fasta and --annotations go together (with --ontology for GO, without "
              "it for a flat protein-to-label table), or use --data-dir", file=sys.stderr)
        return 2
    name = None
    if args.fasta:
        fasta, annotations = [Path(args.fasta)], Path(args.annotations)
        ontology = Path(args.ontology) if args.ontology else None
    else:
        root = data_dir(args.data_dir)
        fasta = [root / "human.fasta", root / "swissprot.fasta"]
        annotations, ontology = PREPARED_CONCEPTS[args.concepts]
        annotations, ontology, name = root / annotations, root / ontology if ontology else None, args.concepts
    if not 0 < args.max_term_share <= 1:
        print(f"sae-engine evaluate: error: --max-term-share must be in (0, 1], got {args.max_term_share}", file=sys.stderr)
        return 2
    settings = Settings(seed=args.seed, top_n=None if args.all_active else args.top_n, max_term_share=args.max_term_share)
    try:
        summary = evaluate_files(args.units, Path(args.out), fasta=fasta, annotations=annotations, ontology=ontology,
                                 store=Path(args.store) if args.store else None, layer=args.layer, settings=settings,
                                 random_dictionaries=args.random_dictionaries, concepts_name=name)
    except EvaluationInputError as error:
        print(f"sae-engine evaluate: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(headline(summary)))
    print(f"-> {Path(args.out) / 'evaluation.json'} and {Path(args.out) / 'units'}/")
    return 0


# --concepts with a prepared data folder: (annotations, ontology or None for a flat table)
PREPARED_CONCEPTS = {"go": ("go_annotations.tsv", "go.sqlite"), "pfam": ("human_pfam.tsv", None)}


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sae-engine evaluate``."""
    p = commands.add_parser("evaluate", help="held-out, length- and composition-controlled evaluation of unit families against GO or any concept table, with nulls",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--units", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a family of units: per-protein activations written by `sae-engine features` (repeatable)")
    p.add_argument("--data-dir", help="prepared data folder (default: see `sae-engine data prepare`)")
    p.add_argument("--concepts", choices=sorted(PREPARED_CONCEPTS), default="go",
                   help="with --data-dir: GO terms (default) or the human Pfam families (a flat concept set)")
    p.add_argument("--fasta", help="protein sequences (instead of --data-dir)")
    p.add_argument("--annotations", help="concepts: GO annotations (GAF or accession<TAB>GO id) with --ontology, or any "
                   "accession<TAB>label table without it (instead of --data-dir)")
    p.add_argument("--ontology", help="GO as .obo or GO.sqlite; absent: --annotations is a flat concept set")
    p.add_argument("--store", help="activation store of the units: random directions are drawn in its space")
    p.add_argument("--layer", type=int, help="layer of --store")
    p.add_argument("--random-dictionaries", action="store_true",
                   help="also compare each family with a random dictionary of its own size (needs --store)")
    p.add_argument("--out", required=True, help="output folder (evaluation.json, units/*.tsv)")
    p.add_argument("--seed", type=int, default=0, help="split and null seed (default 0)")
    p.add_argument("--top-n", type=int, default=DEFAULT_TOP_N, help=f"study set size (default {DEFAULT_TOP_N})")
    p.add_argument("--max-term-share", type=float, default=Settings.max_term_share,
                   help=f"concepts cover at most this share of the background (default {Settings.max_term_share}; "
                        "raise it for small protein sets)")
    p.add_argument("--all-active", action="store_true", help="study sets: every protein a unit fires on (not the top N)")
    p.set_defaults(run=_run)
