"""``sae-engine demo``: from real human proteins to GO-enriched SAE features, against ESM2 neurons.

Steps: prepare the data (idempotent), train a residue-level TopK SAE on ESM2 activations of the
first ``proteins`` human Swiss-Prot proteins (extracting the store on the way), pool the SAE's
code and the ReLU'd ESM2 neurons per protein, and test every feature of both against GO. The
headline is the share of features with at least one term at q <= 0.05, per namespace, for SAE
features and for neurons, each feature judged on its strongest 5% of proteins (at least 10);
tables, a JSON summary and the HTML report (``report/index.html``) land in the output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from .config import load_config

ALPHA = 0.05
LAYER = 4


def _enrich(activations, ontology, annotated, relations, out: Path, prefix: str) -> dict[str, float]:
    """Enrichment of one feature set; writes the significant rows; returns per-namespace shares."""
    from .go.enrich import enrich_features, study_sets, write_table
    from .go.ontology import NAMESPACES

    if annotated.proteins != activations.ids:
        raise ValueError("the annotation matrix must have the activations' proteins as its rows")
    # Study sets: each feature's strongest 5% of proteins (at least 10), so dense ESM2 neurons and
    # sparse SAE features are judged on sets of one size.
    top_n = max(10, len(activations.ids) // 20)
    study = study_sets(activations.max, top_n=top_n)  # [F, P]
    result = enrich_features(study, annotated.matrix, ontology.namespace, ontology.ancestor_matrix(relations))
    features = [f"{prefix}{i}" for i in range(study.shape[0])]
    write_table(out, result, features, ontology, max_q=ALPHA)
    live = int((study.getnnz(axis=1) > 0).sum())
    significant = result.log_q <= math.log(ALPHA)
    shares = {}
    for ns_index, ns in enumerate(NAMESPACES):
        hit = np.unique(result.feature[significant & (ontology.namespace[result.term] == ns_index)])
        shares[ns] = len(hit) / max(live, 1)
    shares["any"] = len(np.unique(result.feature[significant])) / max(live, 1)
    shares["features_tested"] = live
    shares["study_set_size"] = top_n
    return shares


def run_demo(out_dir: Path, proteins: int = 400, n_latents: int = 4096, data: Path | None = None) -> dict:
    """Run the whole pipeline into ``out_dir``; returns the summary (also saved as summary.json)."""
    from .esm.prepare import data_dir, prepare
    from .features import load_sae_code, neuron_code, protein_activations
    from .go.annotations import CountedWarnings, annotation_matrix, read_annotations
    from .go.ontology import load_ontology
    from .trainer import train

    out_dir.mkdir(parents=True, exist_ok=True)
    root = data_dir(data)
    prepare(root, progress=True)
    store = out_dir / "store"
    config = load_config(None, [
        f"model.n_latents={n_latents}", "model.k=32", "model.dead_tokens=200000",
        "data.source='esm'", f"data.esm.fasta='{root / 'human.fasta'}'", f"data.esm.max_proteins={proteins}",
        f"data.esm.store='{store}'", f"data.esm.layer={LAYER}", "data.buffer_size=65536", "data.eval_tokens=8192",
        "train.batch_size=1024", "train.lr=5e-4", "train.warmup_steps=20", "train.decay='cosine'",
        "train.eval_every=50", "train.checkpoint_every=50", f"train.out_dir='{out_dir / 'sae'}'",
    ])
    print(f"[1/3] training an SAE on layer {LAYER} of ESM2 over {proteins} human proteins", file=sys.stderr)
    trained = train(config)
    print("[2/3] per-protein activations of SAE features and ESM2 neurons", file=sys.stderr)
    sae_code, n = load_sae_code(out_dir / "sae")
    sae_acts = protein_activations(store, LAYER, sae_code, n)
    neuron_acts = protein_activations(store, LAYER, neuron_code, config.model.d_in)
    sae_acts.save(out_dir / "sae_activations.npz")
    neuron_acts.save(out_dir / "neuron_activations.npz")
    print("[3/3] GO enrichment of every feature", file=sys.stderr)
    ontology = load_ontology(root / "go.sqlite")
    warnings = CountedWarnings()
    pairs = read_annotations(root / "go_annotations.tsv", ontology, warnings)
    annotated = annotation_matrix(pairs, ontology, sae_acts.ids, ("is_a",), warnings)
    # The last logged metrics (a rerun of a finished demo trains no further steps).
    records = [json.loads(line) for line in (out_dir / "sae" / "metrics.jsonl").read_text().splitlines()]
    last = {key: value for record in records for key, value in record.items()}
    summary = {
        "model": json.loads((store / "manifest.json").read_text())["model"].get("description", ""),
        "proteins": len(sae_acts.ids),
        "training": {**last, "steps": trained.step, "tokens": trained.tokens},
        "sae": _enrich(sae_acts, ontology, annotated, ("is_a",), out_dir / "sae_enrichment.tsv", "f"),
        "neurons": _enrich(neuron_acts, ontology, annotated, ("is_a",), out_dir / "neuron_enrichment.tsv", "neuron"),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import build_report

    build_report(out_dir, root, LAYER)
    return summary


def _command(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .trainer import TrainingError

    scale = max(args.scale, 1)
    try:
        summary = run_demo(Path(args.out), proteins=400 * scale, n_latents=4096 * scale, data=args.data_dir)
    except (ConfigError, TrainingError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"sae-engine demo: error: {error}", file=sys.stderr)
        return 1
    sae, neurons = summary["sae"], summary["neurons"]
    print(f"{summary['model']}\n{summary['proteins']} proteins; SAE eval FVU {summary['training'].get('eval_fvu', float('nan')):.3f}")
    print(f"features with a GO term at q <= {ALPHA}:  SAE {100 * sae['any']:.1f}% of {sae['features_tested']}"
          f"  vs  ESM2 neurons {100 * neurons['any']:.1f}% of {neurons['features_tested']}")
    for ns in ("BP", "MF", "CC"):
        print(f"  {ns}: SAE {100 * sae[ns]:.1f}%  neurons {100 * neurons[ns]:.1f}%")
    print(f"report: {Path(args.out) / 'report' / 'index.html'} (summary.json, enrichment tables, sae/ beside it)")
    return 0


def register(commands) -> None:
    """Add ``sae-engine demo``."""
    parser = commands.add_parser("demo", help="the whole pipeline on real human proteins, against ESM2 neurons")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--scale", type=int, default=1, help="multiply proteins (400) and latents (4096)")
    parser.add_argument("--data-dir", default=None, help="prepared data folder (default: see data prepare)")
    parser.set_defaults(run=_command)
