"""A static HTML report of a demo run: opens from disk, no server.

``index.html``: the headline figure (share of features with a GO term at q <= 0.05 per
namespace, SAE features against ESM2 neurons), latent statistics, the training curves, and a
table of the features with the strongest enrichment. ``features/<feature>.html``: the feature's
enriched terms, its activation histogram over proteins, its top proteins with their gene names,
Pfam families and GO terms, and the per-residue activation track of its top protein.
"""
from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .features import ProteinActivations, load_sae_backend

TOP_PROTEINS = 10


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _read_table(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _two_column(path: Path) -> dict[str, list[str]]:
    """accession -> values from a two-column TSV with a header."""
    out: dict[str, list[str]] = {}
    if path.exists():
        with path.open() as handle:
            next(handle, None)
            for line in handle:
                key, _, value = line.rstrip("\n").partition("\t")
                out.setdefault(key, []).append(value)
    return out


def gene_names(data_dir: Path) -> dict[str, str]:
    """accession -> 'SYMBOL: gene name' from the prepared human_names.tsv (empty if absent)."""
    return {acc: value[0].replace("\t", ": ", 1) for acc, value in _two_column(Path(data_dir) / "human_names.tsv").items()}


def _shares_figure(summary: dict, out: Path) -> None:
    plt = _plt()
    names = ["BP", "MF", "CC", "any"]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, (label, key) in zip((-0.2, 0.2), (("SAE features", "sae"), ("ESM2 neurons", "neurons"))):
        ax.bar(x + offset, [100 * summary[key][n] for n in names], width=0.4, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("% of features with a GO term, q <= 0.05")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _histogram(values: np.ndarray, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 2.6))
    ax.hist(values, bins=30)
    ax.set_xlabel("max activation per protein")
    ax.set_ylabel("proteins")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _track(values: np.ndarray, protein: str, out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.2))
    ax.plot(np.arange(1, len(values) + 1), values)
    ax.set_xlabel(f"residue of {protein}")
    ax.set_ylabel("activation")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def _residue_rows(store_dir: Path, layer: int) -> dict[str, np.ndarray]:
    """protein -> its first window's residue vectors [L, d] (the store is memory-mapped)."""
    from .esm.extract import ActivationStore

    store = ActivationStore(store_dir)
    if store.manifest["settings"].get("pool", "none") != "none":
        return {}  # a pooled store has no residues to draw
    arrays = {s["name"]: np.load(p, mmap_mode="r") for s, p in zip(store.manifest["shards"], store.shard_paths(layer))}
    rows: dict[str, np.ndarray] = {}
    for window in store.index():
        if window["id"] not in rows:
            rows[window["id"]] = arrays[window["shard"]][window["offset"] : window["offset"] + window["rows"]]
    return rows


def _page(title: str, body: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:90%}th{background:#eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build_report(demo_dir: Path, data_dir: Path, layer: int, features: int = 50) -> Path:
    """Write ``demo_dir/report/`` for a finished demo; returns the index path."""
    demo_dir = Path(demo_dir)
    out = demo_dir / "report"
    (out / "features").mkdir(parents=True, exist_ok=True)
    summary = json.loads((demo_dir / "summary.json").read_text())
    enrichment = _read_table(demo_dir / "sae_enrichment.tsv")
    acts = ProteinActivations.load(demo_dir / "sae_activations.npz")
    pfam = _two_column(data_dir / "human_pfam.tsv")
    names = gene_names(data_dir)
    go_terms = {row["go_id"]: row["go_name"] for row in enrichment}
    annotations = _two_column(data_dir / "go_annotations.tsv")
    sae = load_sae_backend(demo_dir / "sae")
    residues = _residue_rows(demo_dir / "store", layer)

    _shares_figure(summary, out / "shares.png")
    if (demo_dir / "sae" / "curves.png").exists():
        shutil.copy(demo_dir / "sae" / "curves.png", out / "curves.png")
    best: dict[str, dict[str, str]] = {}
    for row in enrichment:
        if row["feature"] not in best or float(row["log10_p"]) < float(best[row["feature"]]["log10_p"]):
            best[row["feature"]] = row
    chosen = sorted(best.values(), key=lambda r: float(r["log10_p"]))[:features]

    index_rows = []
    for row in chosen:
        name = row["feature"]
        column = int(name[1:])
        index_rows.append([f"<a href='features/{name}.html'>{name}</a>", html.escape(row["go_id"]),
                           html.escape(row["go_name"]), row["namespace"], row["q_value"]])
        _feature_page(out, name, column, enrichment, acts, pfam, names, annotations, go_terms, sae, residues)
    training = summary["training"]
    body = (
        f"<h1>sae-engine demo report</h1><p>{html.escape(summary['model'])}</p>"
        f"<p>{summary['proteins']} proteins; {training.get('steps')} training steps; held-out FVU "
        f"{training.get('eval_fvu', float('nan')):.3f}; dead latents {100 * training.get('dead_fraction', 0):.1f}%, "
        f"dense latents {100 * training.get('dense_fraction', 0):.1f}%.</p>"
        f"<h2>Features with a GO term at q &le; 0.05</h2>"
        f"<p>SAE features: {100 * summary['sae']['any']:.1f}% of {summary['sae']['features_tested']}; "
        f"ESM2 neurons: {100 * summary['neurons']['any']:.1f}% of {summary['neurons']['features_tested']} "
        f"(study sets: each feature's strongest {summary['sae']['study_set_size']} proteins).</p>"
        "<img src='shares.png' alt='enriched share per namespace'>"
        "<h2>Training</h2><img src='curves.png' alt='training curves' style='max-width:100%'>"
        f"<h2>Most strongly enriched features</h2>"
        + (_table(["feature", "GO id", "term", "namespace", "q"], index_rows) if index_rows
           else "<p>No feature reached q &le; 0.05 (too few proteins: try <code>--scale</code>).</p>")
    )
    index = out / "index.html"
    index.write_text(_page("sae-engine demo report", body))
    return index


def _feature_page(out, name, column, enrichment, acts, pfam, names, annotations, go_terms, sae, residues) -> None:
    terms = [r for r in enrichment if r["feature"] == name][:20]
    values = acts.max[:, column].toarray().ravel()
    _histogram(values[values > 0], out / "features" / f"{name}_hist.png")
    top = np.argsort(-values)[:TOP_PROTEINS]
    protein_rows = []
    for p in top:
        if values[p] <= 0:
            break
        protein = acts.ids[p]
        named = [f"{g} ({html.escape(go_terms[g])})" if g in go_terms else g for g in annotations.get(protein, [])[:6]]
        protein_rows.append([html.escape(protein), html.escape(names.get(protein, "-")), f"{values[p]:.3f}",
                             html.escape(", ".join(pfam.get(protein, [])) or "-"), ", ".join(named) or "-"])
    track = ""
    if len(top) and values[top[0]] > 0 and acts.ids[top[0]] in residues:
        protein = acts.ids[top[0]]
        code_values, code_indices = sae.encode(torch.from_numpy(np.array(residues[protein], dtype=np.float32)))
        per_residue = (code_values.float() * (code_indices == column)).sum(dim=1).numpy()
        _track(per_residue, protein, out / "features" / f"{name}_track.png")
        track = f"<h2>Per-residue activation in {html.escape(protein)}</h2><img src='{name}_track.png'>"
    body = (
        f"<p><a href='../index.html'>index</a></p><h1>Feature {name}</h1>"
        "<h2>Enriched GO terms</h2>"
        + _table(["GO id", "term", "namespace", "in study", "fold", "q", "most specific"],
                 [[html.escape(r["go_id"]), html.escape(r["go_name"]), r["namespace"],
                   f"{r['study_count']}/{r['study_size']}", r["fold_enrichment"], r["q_value"], r["most_specific"]]
                  for r in terms])
        + f"<h2>Activation over proteins</h2><img src='{name}_hist.png'>"
        + "<h2>Top proteins</h2>" + _table(["protein", "gene: name", "max activation", "Pfam", "GO terms"], protein_rows)
        + track
    )
    (out / "features" / f"{name}.html").write_text(_page(f"feature {name}", body))
