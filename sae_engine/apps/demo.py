"""``sae-engine demo``: do SAE features of ESM2 capture biology better than neurons and nulls?

Steps: prepare the data (idempotent); draw a seeded random sample of human Swiss-Prot proteins of
50-1000 residues (judged on) and one of other Swiss-Prot proteins, none sharing an accession or a
sequence with any human protein (trained on); extract layer 4 of ESM2 for both; train a
residue-level TopK SAE on the training residue vectors and a protein-level TopK SAE on their
mean-pooled ones (the setting of Gujral et al.);
pool every family per protein; evaluate all of them with ``sae_engine.evaluation`` (held-out,
length- and composition-controlled, with null families); write ``summary.json``, the
evaluation and the HTML report (``report/index.html``).

Families: residue-level SAE features (max over residues), protein-level SAE features, ESM2
neurons of both signs, the same neurons sparsified to the SAE's k per residue, random
directions, and a random dictionary of the size of each of the SAEs and the neurons (pooled as
that family is); the composition and permuted-label nulls come from the evaluation itself. At
matched counts every family is compared with the neurons twice: frequency-matched subsets, and
random subsets of the larger family (five seeded draws, mean and spread).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LAYER = 4
DEFAULT_PROTEINS = 1000
MIN_LENGTH, MAX_LENGTH = 50, 1000
K = 32
PROTEIN_LATENTS, PROTEIN_K, PROTEIN_EPOCHS = 256, 16, 60  # 512 latents, k=8: a quarter dead, the same terms
REFERENCE = "neurons"  # the family every other one is compared with at matched counts


def sample_proteins(fasta: Path, n: int, seed: int = 0, min_length: int = MIN_LENGTH,
                    max_length: int = MAX_LENGTH) -> list:
    """A seeded random sample (without replacement, in file order) of ``n`` records of
    ``min_length``-``max_length`` residues."""
    from ..esm.fasta import read_fasta

    records = [r for r in read_fasta(fasta) if min_length <= len(r.sequence) <= max_length]
    if n > len(records):
        raise ValueError(f"{fasta}: asked for {n} proteins of {min_length}-{max_length} residues, it holds {len(records)}")
    chosen = np.sort(np.random.default_rng(seed).choice(len(records), size=n, replace=False))
    return [records[i] for i in chosen]


def training_sample(root: Path, n: int, seed: int) -> tuple[list, dict]:
    """``n`` Swiss-Prot proteins of 50-1000 residues, seeded, none of which shares an accession or
    an identical sequence with any human protein (the demo judges human proteins), and the counts."""
    from ..esm.fasta import read_fasta
    from .study_corpus import training_order

    human = list(read_fasta(root / "human.fasta"))
    records, stats = training_order(list(read_fasta(root / "swissprot.fasta")), human, n, seed, MIN_LENGTH, MAX_LENGTH)
    return records, {"source": str(root / "swissprot.fasta"), "proteins": n, "seed": seed, **stats}


def _train(overrides: list[str], source=None):
    """Train a run from config overrides (the demo's settings; see examples/ for the layout),
    on ``source`` when given, else on the source the config names."""
    from ..config import load_config
    from ..training.trainer import train

    config = load_config(None, overrides)
    return config, train(config, source)


def _last_metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: value for record in records for key, value in record.items()}


def _families(out_dir: Path, store: Path, ids: list[str], means: np.ndarray, seed: int) -> dict:
    """Per-protein activations of every family, saved as ``<name>_activations.npz``; -> name: [P, U]."""
    import scipy.sparse as sp
    import torch

    from ..evaluation.nulls import random_directions_in_store
    from ..evaluation.features import (ProteinActivations, load_sae_code, pooled_dense, protein_activations,
                           signed_neurons, topk_code)
    from ..training.trained import load_trained_sae

    d = means.shape[1]
    sae_code, n = load_sae_code(out_dir / "sae")
    protein_sae = load_trained_sae(out_dir / "protein_sae")
    values, indices = (t.numpy() for t in protein_sae.encode(torch.from_numpy(means)))
    fired = (values > 0) & (indices >= 0)
    rows = np.broadcast_to(np.arange(len(ids))[:, None], values.shape)
    protein_level = sp.csr_matrix((values[fired], (rows[fired], indices[fired])),
                                  shape=(len(ids), protein_sae.config.model.n_latents), dtype=np.float32)
    acts = {
        "sae": protein_activations(store, LAYER, sae_code, n),
        "protein_sae": ProteinActivations(ids, protein_level, (protein_level > 0).astype(np.float32)),
        "neurons": pooled_dense(store, LAYER, signed_neurons, 2 * d),
        "neurons_topk": protein_activations(store, LAYER, topk_code(signed_neurons, K), 2 * d),
        "random_directions": random_directions_in_store(store, LAYER, seed + 1),
    }
    for name, family in acts.items():
        if family.ids != ids:
            raise RuntimeError(f"{name}: protein order differs from the store's")
        family.save(out_dir / f"{name}_activations.npz")
    return {name: family.max for name, family in acts.items()}


def _random_dictionaries(store: Path, ids: list[str], means: np.ndarray, sizes: dict[str, int], seed: int
                         ) -> dict[str, np.ndarray]:
    """A random dictionary of each family's own size, pooled as that family is: ``[P, units]`` max
    activations over residues (residue-level families), or on the mean vectors (protein_sae)."""
    from ..evaluation.nulls import random_dictionary_in_store, random_dictionary_on_vectors
    from ..training.precision import resolve_precision
    import torch

    dtype = torch.bfloat16 if resolve_precision("auto", "cpu").dtype == "bf16" else torch.float32
    out = {}
    for name, size in sizes.items():
        if name == "protein_sae":
            out[name] = random_dictionary_on_vectors(means, size, seed)
            continue
        store_ids, acts = random_dictionary_in_store(store, LAYER, size, seed, dtype)
        if store_ids != ids:
            raise RuntimeError(f"random dictionary of {name}: protein order differs from the store's")
        out[name] = acts
    return out


def _enrichment_table(acts, labels, top_n: int, out: Path) -> None:
    """Every SAE feature's GO enrichment over all sampled proteins (q <= 0.05 rows), the input
    ``sae-engine describe`` picks features from. Not held out, not controlled: the evaluation is
    what says whether a feature passes."""
    from ..go.enrich import enrich_features, study_sets, write_table

    result = enrich_features(study_sets(acts, top_n=2 * top_n), labels.annotations, labels.ontology.namespace,
                             labels.ancestors)
    write_table(out, result, [f"f{i}" for i in range(acts.shape[1])], labels.ontology, max_q=0.05)


def run_demo(out_dir: Path, proteins: int = DEFAULT_PROTEINS, n_latents: int = 4096, data: Path | None = None,
             seed: int = 0, train_proteins: int | None = None) -> dict:
    """Run the whole pipeline into ``out_dir``; returns the summary (also saved as summary.json).

    The SAEs train on ``train_proteins`` (default: as many as judged) Swiss-Prot proteins apart
    from every human protein, and are judged on ``proteins`` sampled human ones."""
    from ..esm.extract import ActivationStore, ExtractConfig, extract_to_store
    from ..esm.fasta import write_fasta
    from ..esm.models import load_model
    from ..esm.prepare import data_dir, prepare
    from ..evaluation import (Settings, evaluate, headline, matched_comparison, random_subset_comparison,
                              write_evaluation)
    from ..evaluation.inputs import load_labels
    from ..evaluation.features import mean_vectors
    from ..training.precision import resolve_precision
    from ..data.sources import ArraySource

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = data_dir(data)
    prepare(root, progress=True)
    precision = resolve_precision("auto", "cpu")
    sample = sample_proteins(root / "human.fasta", proteins, seed)
    write_fasta(sample, out_dir / "proteins.fasta")
    training, corpus = training_sample(root, train_proteins or proteins, seed)
    write_fasta(training, out_dir / "training.fasta")
    store, training_store = out_dir / "store", out_dir / "training_store"
    for fasta, target, what in ((out_dir / "proteins.fasta", store, f"{proteins} sampled human proteins (judged on)"),
                                (out_dir / "training.fasta", training_store,
                                 f"{len(training)} Swiss-Prot proteins apart from every human one (trained on)")):
        if not ((target / "manifest.json").exists() and ActivationStore(target).complete):
            print(f"[1/5] ESM2 layer {LAYER} of {what} ({precision.dtype}: {precision.reason})", file=sys.stderr)
            extract_to_store(fasta, load_model("default", data_dir=root), target,
                             ExtractConfig(layers=(LAYER,), precision=precision.dtype))
    print(f"[2/5] a residue-level SAE ({n_latents} latents, k={K})", file=sys.stderr)
    _, trained = _train([
        f"model.n_latents={n_latents}", f"model.k={K}", "model.dead_tokens=200000",
        "data.source='esm'", f"data.esm.store='{training_store}'", f"data.esm.layer={LAYER}", "data.buffer_size=65536",
        "data.eval_tokens=8192", "train.batch_size=1024", "train.lr=5e-4", "train.warmup_steps=20",
        "train.decay='cosine'", "train.eval_every=50", "train.checkpoint_every=50", f"train.out_dir='{out_dir / 'sae'}'",
    ])
    print(f"[3/5] a protein-level SAE on mean-pooled vectors ({PROTEIN_LATENTS} latents, k={PROTEIN_K}, "
          f"{PROTEIN_EPOCHS} epochs)", file=sys.stderr)
    train_ids, train_means = mean_vectors(training_store, LAYER)
    order = np.concatenate([np.random.default_rng(seed + e).permutation(len(train_ids)) for e in range(PROTEIN_EPOCHS)])
    _, protein_trained = _train([
        f"model.n_latents={PROTEIN_LATENTS}", f"model.k={PROTEIN_K}", f"model.dead_tokens={20 * len(train_ids)}",
        "data.buffer_size=16384", f"data.eval_tokens={min(256, len(train_ids) // 4)}", "train.batch_size=256",
        "train.lr=1e-3", "train.warmup_steps=20", "train.decay='cosine'", "train.eval_every=50",
        "train.checkpoint_every=100", f"train.out_dir='{out_dir / 'protein_sae'}'",
    ], ArraySource(train_means[order]))  # every protein once per epoch, reshuffled each epoch
    ids, means = mean_vectors(store, LAYER)  # the judged proteins
    print("[4/5] per-protein activations of every family, and random dictionaries of their sizes", file=sys.stderr)
    families = _families(out_dir, store, ids, means, seed)
    random_directions = families.pop("random_directions")
    dictionaries = _random_dictionaries(store, ids, means, {name: families[name].shape[1] for name in
                                                            ("sae", "protein_sae", "neurons")}, seed + 1)
    print("[5/5] held-out, controlled evaluation with nulls", file=sys.stderr)
    labels = load_labels(root / "go_annotations.tsv", root / "go.sqlite", ids)
    sequence = {r.id: r.sequence for r in sample}
    settings = Settings(seed=seed, top_n=max(10, proteins // 40))  # 5 % of each half
    result = evaluate(families, ids, [sequence[p] for p in ids], labels.annotations, labels.ontology.namespace,
                      labels.ancestors, settings, random_directions=random_directions, random_dictionaries=dictionaries)
    evaluation = write_evaluation(out_dir / "evaluation", result, labels.ontology)
    _enrichment_table(families["sae"], labels, settings.top_n, out_dir / "sae_enrichment.tsv")
    matched = {f"{name} vs {REFERENCE}": matched_comparison(result.families[name], result.families[REFERENCE])
               for name in result.families if name != REFERENCE}
    matched_random = {f"{name} vs {REFERENCE}": random_subset_comparison(result.families[name],
                                                                         result.families[REFERENCE], seed=seed)
                      for name in result.families if name != REFERENCE}
    summary = {
        "model": json.loads((store / "manifest.json").read_text())["model"].get("description", ""),
        "proteins": len(ids),
        "sample": {"seed": seed, "lengths": [MIN_LENGTH, MAX_LENGTH], "source": str(root / "human.fasta")},
        "training_corpus": corpus,
        "precision": {"dtype": precision.dtype, "reason": precision.reason},
        "training": {"sae": {**_last_metrics(out_dir / "sae"), "steps": trained.step, "tokens": trained.tokens},
                     "protein_sae": {**_last_metrics(out_dir / "protein_sae"), "steps": protein_trained.step,
                                     "tokens": protein_trained.tokens}},
        "evaluation": evaluation,
        "matched": matched,
        "matched_random": matched_random,
    }
    summary["headline"] = headline(evaluation)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from .report import build_report

    build_report(out_dir, root, LAYER)
    return summary


def matched_lines(summary: dict) -> list[str]:
    """The matched-count comparisons, two lines per pair: frequency-matched, and random subsets."""
    lines = []
    for pair, m in summary["matched"].items():
        lines.append(f"  {pair} ({m['units_each']} units each, matched by activation frequency): pass "
                     f"{100 * m['a']['pass_share']:.1f}% vs {100 * m['b']['pass_share']:.1f}%, distinct terms "
                     f"{m['a']['distinct_terms']} vs {m['b']['distinct_terms']}")
        r = summary.get("matched_random", {}).get(pair)
        if r:
            lines.append(f"  {pair} ({r['units_each']} units each, {r['draws']} random subsets of the larger): pass "
                         f"{100 * r['a']['pass_share_mean']:.1f}% vs {100 * r['b']['pass_share_mean']:.1f}%, distinct "
                         f"terms {r['a']['distinct_terms_mean']:.1f} (sd {r['a']['distinct_terms_sd']:.1f}) vs "
                         f"{r['b']['distinct_terms_mean']:.1f} (sd {r['b']['distinct_terms_sd']:.1f})")
    return lines


def _command(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..evaluation import EvaluationInputError
    from ..training.trainer import TrainingError

    try:
        summary = run_demo(Path(args.out), proteins=args.proteins, n_latents=args.latents, data=args.data_dir,
                           seed=args.seed, train_proteins=args.train_proteins)
    except (ConfigError, TrainingError, EvaluationInputError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"sae-engine demo: error: {error}", file=sys.stderr)
        return 1
    sae = summary["training"]["sae"]
    corpus = summary["training_corpus"]
    print(f"{summary['model']}\n{summary['proteins']} sampled human proteins judged; the SAEs trained on "
          f"{corpus['proteins']} Swiss-Prot proteins apart from them (no human accession or sequence); residue SAE "
          f"held-out FVU {sae.get('eval_fvu', float('nan')):.3f}")
    print("held-out, length- and composition-controlled GO evaluation (pass: held-out F1 >= 0.5 and "
          "the held-out top proteins enriched, q <= 0.05):")
    print("\n".join(summary["headline"]))
    print("\n".join(matched_lines(summary)))
    print(f"report: {Path(args.out) / 'report' / 'index.html'} (summary.json, evaluation/ beside it)")
    return 0


def register(commands) -> None:
    """Add ``sae-engine demo``."""
    parser = commands.add_parser("demo", help="SAE features against ESM2 neurons and nulls on real human proteins")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--proteins", type=int, default=DEFAULT_PROTEINS,
                        help=f"sampled human proteins (default {DEFAULT_PROTEINS}; the run time grows with it)")
    parser.add_argument("--latents", type=int, default=4096, help="residue-level SAE width (default 4096)")
    parser.add_argument("--train-proteins", type=int, default=None,
                        help="Swiss-Prot proteins the SAEs train on, none of them human (default: as many as --proteins)")
    parser.add_argument("--seed", type=int, default=0, help="sample, split and null seed (default 0)")
    parser.add_argument("--data-dir", default=None, help="prepared data folder (default: see data prepare)")
    parser.set_defaults(run=_command)
