"""A study's proteins: the evaluation proteome, and a training corpus apart from it, nested by scale.

The corpus is one seeded order of the training pool (proteins of the corpus FASTA within the
length range, minus every protein of the evaluation FASTA, by accession and by identical
sequence); scale N is its first N proteins, so every smaller corpus is a prefix of the larger
ones. The order is cut into parts at the scales (``part-0`` = proteins 0..s1, ``part-1`` =
s1..s2, ...): each part is extracted once, and scale ``s_i`` trains on parts 0..i.

Everything is written once under ``<out>/corpus`` with a fingerprint of what made it; a second
run with the same settings reads it back, and other settings are an error (another out_dir).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, write_json
from ..esm.fasta import Record, read_fasta, write_fasta
from .study_config import StudyConfig, StudyConfigError


@dataclass(frozen=True)
class Corpus:
    """The study's proteins.

    Attributes:
        evaluation: FASTA of the evaluation proteome (in file order).
        evaluation_ids: its protein ids.
        parts: FASTA of each corpus part, smallest scale first.
        scales: the corpus scales, ascending; part ``i`` holds proteins ``scales[i-1]..scales[i]``.
        order: the corpus accessions in sampled order (``scales[-1]`` of them).
        stats: counts for the record (pool size, proteins excluded by accession and by sequence).
    """

    evaluation: Path
    evaluation_ids: list[str]
    parts: list[Path]
    scales: list[int]
    order: list[str]
    stats: dict

    def parts_for(self, scale: int) -> list[Path]:
        """The parts whose union is the corpus of ``scale`` proteins."""
        return self.parts[: self.scales.index(scale) + 1]


def evaluation_fasta(config: StudyConfig, root: Path) -> Path:
    return Path(config.evaluation.fasta).expanduser() if config.evaluation.fasta else root / "human.fasta"


def corpus_fasta(config: StudyConfig, root: Path) -> Path:
    return Path(config.corpus.fasta).expanduser() if config.corpus.source == "fasta" else root / "swissprot.fasta"


def _require(path: Path, key: str) -> Path:
    if not path.exists():
        raise StudyConfigError(f"{key}: {path} does not exist (run `sae-engine data prepare`, or name another file)")
    return path


def select_evaluation(records: Sequence[Record], min_length: int, max_length: int, max_proteins: int | None,
                      seed: int) -> list[Record]:
    """Records within the length range, in file order; a seeded sample of ``max_proteins`` when given."""
    kept = [r for r in records if min_length <= len(r.sequence) <= max_length]
    if max_proteins is not None and max_proteins < len(kept):
        chosen = np.sort(np.random.default_rng(seed).choice(len(kept), size=max_proteins, replace=False))
        kept = [kept[i] for i in chosen]
    return kept


def training_order(pool: Sequence[Record], excluded: Sequence[Record], n: int, seed: int, min_length: int,
                   max_length: int) -> tuple[list[Record], dict]:
    """The first ``n`` proteins of a seeded order of ``pool`` within the length range, none of
    which shares an accession or an identical sequence with ``excluded``; and the counts."""
    ids = {r.id for r in excluded}
    sequences = {r.sequence for r in excluded}
    in_range = [r for r in pool if min_length <= len(r.sequence) <= max_length]
    by_id = sum(r.id in ids for r in in_range)
    by_sequence = sum(r.id not in ids and r.sequence in sequences for r in in_range)
    eligible = [r for r in in_range if r.id not in ids and r.sequence not in sequences]
    if n > len(eligible):
        raise StudyConfigError(f"corpus.scales: the largest scale, {n}, exceeds the {len(eligible)} proteins of "
                               f"{min_length}-{max_length} residues left after excluding the evaluation proteins")
    order = np.random.default_rng(seed).permutation(len(eligible))[:n]
    stats = {"pool_in_length_range": len(in_range), "excluded_by_accession": by_id,
             "excluded_by_sequence": by_sequence, "eligible": len(eligible)}
    return [eligible[i] for i in order], stats


def _fingerprint(config: StudyConfig, root: Path) -> dict:
    def stamp(path: Path) -> dict:
        stat = path.stat()
        return {"path": str(path.resolve()), "bytes": stat.st_size}

    e, c = config.evaluation, config.corpus
    return {"seed": config.seed, "corpus": {"source": c.source, "lengths": [c.min_length, c.max_length],
                                            "scales": sorted(c.scales), "fasta": stamp(corpus_fasta(config, root))},
            "evaluation": {"lengths": [e.min_length, e.max_length], "max_proteins": e.max_proteins, "seed": e.seed,
                           "fasta": stamp(evaluation_fasta(config, root))}}


def prepare_corpus(config: StudyConfig, root: Path, log=print) -> Corpus:
    """The study's proteins under ``<out>/corpus``, made on the first run and read back after."""
    out = Path(config.out_dir) / "corpus"
    plan_path = out / "plan.json"
    fingerprint = _fingerprint(config, root)
    scales = sorted(config.corpus.scales)
    parts = [out / f"part-{i}.fasta" for i in range(len(scales))]
    evaluation = out / "evaluation.fasta"
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        if plan["fingerprint"] != fingerprint:
            raise StudyConfigError(f"{config.out_dir} holds a study made with other corpus or evaluation settings "
                                   f"({plan_path}); use another out_dir or the same settings")
        return Corpus(evaluation, plan["evaluation_ids"], parts, scales, plan["order"], plan["stats"])
    eval_source = _require(evaluation_fasta(config, root), "evaluation.fasta")
    corpus_source = _require(corpus_fasta(config, root), "corpus.fasta")
    everything = list(read_fasta(eval_source))
    e = config.evaluation
    proteome = select_evaluation(everything, e.min_length, e.max_length, e.max_proteins, e.seed)
    if len(proteome) < 20:
        raise StudyConfigError(f"evaluation: {eval_source} holds {len(proteome)} proteins of {e.min_length}-"
                               f"{e.max_length} residues; a study needs at least 20")
    # every protein of the evaluation file is kept out of training, not only the evaluated ones
    pool = everything if corpus_source.resolve() == eval_source.resolve() else read_fasta(corpus_source)
    order, stats = training_order(list(pool), everything, scales[-1], config.seed, config.corpus.min_length,
                                  config.corpus.max_length)
    stats = {**stats, "evaluation_proteins": len(proteome), "evaluation_file_proteins": len(everything)}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(evaluation) as tmp:
        write_fasta(proteome, tmp)
    for i, path in enumerate(parts):
        with atomic_path(path) as tmp:
            write_fasta(order[(scales[i - 1] if i else 0) : scales[i]], tmp)
    digest = hashlib.sha256("".join(f"{r.id}\t{r.sequence}\n" for r in order).encode()).hexdigest()
    write_json(plan_path, {"fingerprint": fingerprint, "evaluation_ids": [r.id for r in proteome],
                           "order": [r.id for r in order], "stats": {**stats, "corpus_sha256": digest}})
    log(f"[study] corpus: {len(order):,} training proteins in {len(parts)} nested parts (excluded "
        f"{stats['excluded_by_accession']:,} by accession, {stats['excluded_by_sequence']:,} by identical sequence); "
        f"evaluation: {len(proteome):,} proteins")
    return prepare_corpus(config, root, log)


def scale_fasta(corpus: Corpus, scale: int) -> Path:
    """One FASTA of the corpus of ``scale`` proteins (for a live source), written once."""
    path = corpus.parts[0].parent / f"scale-{scale}.fasta"
    if not path.exists():
        with atomic_path(path) as tmp, tmp.open("w") as handle:
            for part in corpus.parts_for(scale):
                handle.write(part.read_text())
    return path
