"""LLM-written feature descriptions, scored by how well they predict held-out activations.

For a feature, proteins are drawn across activation bins (the strongest, the middle of the
active range, and inactive ones), and the prompt lists each with its gene name, Pfam families
and GO terms,
as Gujral et al. do. The model answers with one sentence. To score it, the model reads the
description and, for held-out proteins it has not seen, predicts an activation from 0 to 10;
the score is Pearson's r between predictions and true activations. A null baseline scores each
feature with another feature's description. Every prompt and response is cached on disk by
content hash, so reruns cost nothing. Only this module needs an API key.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..evaluation.features import ProteinActivations

DEFAULT_MODEL = "claude-sonnet-4-5"
SYSTEM = "You are an expert protein biologist interpreting features of a protein language model."


@dataclass
class ProteinInfo:
    """What the prompt says about a protein: its name, Pfam families and GO term names."""

    pfam: list[str]
    go: list[str]
    name: str = ""

    def line(self, accession: str) -> str:
        named = f"{accession} ({self.name})" if self.name else accession
        return f"{named}: Pfam {', '.join(self.pfam) or '-'}; GO {', '.join(self.go[:8]) or '-'}"


class CachedClient:
    """The anthropic Messages API with an on-disk cache keyed by (model, system, prompt)."""

    def __init__(self, cache_dir: Path, model: str = DEFAULT_MODEL, **client_args) -> None:
        import anthropic

        self.client = anthropic.Anthropic(**client_args)
        self.model = model
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def ask(self, prompt: str, max_tokens: int = 300) -> str:
        key = hashlib.sha256(json.dumps([self.model, SYSTEM, prompt]).encode()).hexdigest()
        path = self.cache_dir / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())["response"]
        message = self.client.messages.create(
            model=self.model, max_tokens=max_tokens, system=SYSTEM, messages=[{"role": "user", "content": prompt}]
        )
        text = "".join(block.text for block in message.content if block.type == "text").strip()
        write_text(path, json.dumps({"model": self.model, "prompt": prompt, "response": text}))
        return text


def _bins(values: np.ndarray, per_bin: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """(shown, held_out) protein rows across activation bins: top, middle of the active range, inactive."""
    active = np.flatnonzero(values > 0)
    active = active[np.argsort(-values[active])]
    inactive = np.flatnonzero(values <= 0).tolist()
    middle = active[len(active) // 3 :].tolist()
    pools = [active[: max(2 * per_bin, 1)].tolist(), middle, inactive]
    shown, held = [], []
    for pool in pools:
        picked = rng.sample(pool, min(len(pool), 2 * per_bin))
        shown += picked[::2]
        held += picked[1::2]
    return shown, held


def describe_prompt(feature: str, rows: list[int], acts: np.ndarray, ids: list[str], info: dict[str, ProteinInfo]) -> str:
    lines = [f"activation {acts[r]:.3f} | {info.get(ids[r], ProteinInfo([], [])).line(ids[r])}"
             for r in sorted(rows, key=lambda r: -acts[r])]
    return (f"Feature {feature} of a sparse autoencoder on ESM2 activations. Proteins with their maximum "
            "activation of this feature (0 = inactive):\n" + "\n".join(lines) +
            "\n\nIn one sentence, what biological property does this feature detect? Answer with the sentence only.")


def score_prompt(description: str, rows: list[int], ids: list[str], info: dict[str, ProteinInfo]) -> str:
    lines = [f"{i + 1}. {info.get(ids[r], ProteinInfo([], [])).line(ids[r])}" for i, r in enumerate(rows)]
    return (f"A feature of a protein language model is described as: \"{description}\"\n"
            "For each protein below, predict the feature's activation from 0 (absent) to 10 (strongest).\n"
            + "\n".join(lines) + "\n\nAnswer with one line per protein: '<number>. <prediction>'.")


def parse_predictions(text: str, count: int) -> np.ndarray:
    """'<i>. <value>' lines -> [count] predictions (NaN where a line is missing)."""
    out = np.full(count, np.nan)
    for match in re.finditer(r"^\s*(\d+)\s*[.):]\s*([-+]?\d+(?:\.\d+)?)", text, flags=re.MULTILINE):
        index = int(match.group(1)) - 1
        if 0 <= index < count:
            out[index] = float(match.group(2))
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class Description:
    feature: str
    text: str
    score: float  # Pearson r of predicted vs true held-out activations
    null_score: float  # the same with another feature's description


def describe_features(client: CachedClient, acts: ProteinActivations, features: list[int],
                      info: dict[str, ProteinInfo], per_bin: int = 5, seed: int = 0) -> list[Description]:
    """Describe and score each feature column of ``acts.max``."""
    rng = random.Random(seed)
    drafts = []
    for column in features:
        values = acts.max[:, column].toarray().ravel()
        shown, held = _bins(values, per_bin, rng)
        text = client.ask(describe_prompt(f"f{column}", shown, values, acts.ids, info))
        drafts.append((column, text, held, values))

    def score(text: str, held: list[int], values: np.ndarray) -> float:
        predicted = parse_predictions(client.ask(score_prompt(text, held, acts.ids, info)), len(held))
        return pearson(predicted, values[held])

    results = []
    for i, (column, text, held, values) in enumerate(drafts):
        other = drafts[(i + 1) % len(drafts)][1] if len(drafts) > 1 else ""
        results.append(Description(f"f{column}", text, score(text, held, values), score(other, held, values)))
    return results


def _protein_info(data_dir: Path, go_names: dict[str, str]) -> dict[str, ProteinInfo]:
    from .report import _two_column, gene_names

    pfam = _two_column(data_dir / "human_pfam.tsv")
    go = _two_column(data_dir / "go_annotations.tsv")
    names = gene_names(data_dir)
    proteins = set(pfam) | set(go) | set(names)
    return {p: ProteinInfo(pfam.get(p, []), [go_names.get(t, t) for t in go.get(p, [])], names.get(p, ""))
            for p in proteins}


def _command(args) -> int:
    import csv
    import os
    import sys

    from ..esm.prepare import data_dir

    demo = Path(args.demo)
    if not os.environ.get("ANTHROPIC_API_KEY"):
        print("sae-engine describe: error: set ANTHROPIC_API_KEY (descriptions are written by an LLM)", file=sys.stderr)
        return 2
    try:
        acts = ProteinActivations.load(demo / "sae_activations.npz")
        with (demo / "sae_enrichment.tsv").open() as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
    except (FileNotFoundError, ValueError) as error:
        print(f"sae-engine describe: error: {error} (run `sae-engine demo` first)", file=sys.stderr)
        return 2
    best: dict[int, float] = {}
    for row in rows:
        column = int(row["feature"][1:])
        best[column] = min(best.get(column, 0.0), float(row["log10_p"]))
    features = sorted(best, key=best.get)[: args.features]
    client = CachedClient(demo / "llm_cache", model=args.model, **({"base_url": args.base_url} if args.base_url else {}))
    info = _protein_info(data_dir(args.data_dir), {row["go_id"]: row["go_name"] for row in rows})
    results = describe_features(client, acts, features, info)
    out = demo / "descriptions.tsv"
    out.write_text("feature\tscore\tnull_score\tdescription\n" + "".join(
        f"{r.feature}\t{r.score:.3f}\t{r.null_score:.3f}\t{r.text}\n" for r in results))
    scores = np.array([r.score for r in results])
    nulls = np.array([r.null_score for r in results])
    print(f"{len(results)} features described -> {out}; mean Pearson r {np.nanmean(scores):.3f} "
          f"(shuffled descriptions {np.nanmean(nulls):.3f})")
    return 0


def register(commands) -> None:
    """Add ``sae-engine describe``."""
    parser = commands.add_parser("describe", help="LLM descriptions of a demo's features, scored on held-out proteins")
    parser.add_argument("--demo", default="runs/demo", help="a finished `sae-engine demo` folder")
    parser.add_argument("--features", type=int, default=20, help="how many of the most enriched features")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--base-url", help="Messages API endpoint (default: the SDK's)")
    parser.add_argument("--data-dir", default=None)
    parser.set_defaults(run=_command)
