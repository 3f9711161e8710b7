"""A static HTML report of a demo run: opens from disk, no server.

``index.html``: the held-out, controlled evaluation of every family beside the null families
(table and figure), the matched-count comparison, the training curves, and the passing SAE
features ordered by held-out F1, one per GO term. ``features/<feature>.html``: the feature's
term with its discovery and held-out statistics, its activation histogram over proteins, its top
proteins with their gene names, Pfam families and GO terms, and the per-residue activation track
of its top protein.
"""
from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from ..evaluation.features import ProteinActivations
from ..training.trained import load_trained_sae

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


def _pass_figure(evaluation: dict, out: Path) -> None:
    """Held-out pass share and distinct terms per family, nulls in grey, the false-pass floor dashed."""
    plt = _plt()
    names = [*evaluation["families"], *evaluation["nulls"]]
    rows = [*evaluation["families"].values(), *evaluation["nulls"].values()]
    colors = ["tab:blue"] * len(evaluation["families"]) + ["tab:gray"] * len(evaluation["nulls"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    x = np.arange(len(names))
    left.bar(x, [100 * r["pass_share"] for r in rows], color=colors)
    left.axhline(100 * evaluation["false_pass_floor"], color="k", linestyle="--", linewidth=1)
    left.set_ylabel("% of units passing (held out)")
    right.bar(x, [r["distinct_terms"] for r in rows], color=colors)
    right.set_ylabel("distinct GO terms (passing units)")
    for ax in (left, right):
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
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
    from ..esm.extract import ActivationStore

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


def representatives(table: list[dict[str, str]]) -> list[tuple[dict[str, str], int]]:
    """Passing units ordered by held-out F1, one per best term: (the best unit, how many others share its term)."""
    passing = sorted((r for r in table if r["passes"] == "1"), key=lambda r: -float(r["heldout_f1"]))
    chosen: dict[str, list] = {}
    for row in passing:
        if row["go_id"] in chosen:
            chosen[row["go_id"]][1] += 1
        else:
            chosen[row["go_id"]] = [row, 0]
    return [(row, others) for row, others in chosen.values()]


def _family_table(evaluation: dict) -> str:
    rows = []
    for group in ("families", "nulls"):
        for name, s in evaluation[group].items():
            diff = f"{100 * evaluation['pass_share_minus_best_null'][name]:+.1f}%" if group == "families" else ""
            f1 = f"{s['median_f1']:.2f}" if s["median_f1"] is not None else "-"
            rows.append([html.escape(name if group == "families" else f"null: {name}"), str(s["units"]),
                         str(s["passing"]), f"{100 * s['pass_share']:.1f}%", str(s["distinct_terms"]), f1, diff])
    return _table(["family", "units", "passing", "pass share", "distinct terms", "median held-out F1",
                   "minus best null"], rows)


def build_report(demo_dir: Path, data_dir: Path, layer: int, features: int = 50) -> Path:
    """Write ``demo_dir/report/`` for a finished demo; returns the index path."""
    demo_dir = Path(demo_dir)
    out = demo_dir / "report"
    (out / "features").mkdir(parents=True, exist_ok=True)
    summary = json.loads((demo_dir / "summary.json").read_text())
    evaluation = summary["evaluation"]
    table = _read_table(demo_dir / "evaluation" / "units" / "sae.tsv")
    acts = ProteinActivations.load(demo_dir / "sae_activations.npz")
    pfam = _two_column(data_dir / "human_pfam.tsv")
    names = gene_names(data_dir)
    go_names = {row["go_id"]: row["go_name"] for row in table if row["go_id"]}
    annotations = _two_column(data_dir / "go_annotations.tsv")
    sae = load_trained_sae(demo_dir / "sae")
    residues = _residue_rows(demo_dir / "store", layer)

    _pass_figure(evaluation, out / "pass.png")
    if (demo_dir / "sae" / "curves.png").exists():
        shutil.copy(demo_dir / "sae" / "curves.png", out / "curves.png")
    chosen = representatives(table)
    index_rows = []
    for row, others in chosen[:features]:
        name = f"f{row['unit']}"
        index_rows.append([f"<a href='features/{name}.html'>{name}</a>", html.escape(row["go_id"]),
                           html.escape(row["go_name"]), row["namespace"], f"{float(row['heldout_f1']):.2f}",
                           row["heldout_q"], str(others)])
        _feature_page(out, name, row, acts, pfam, names, annotations, go_names, sae, residues)
    matched = "".join(f"<li>{html.escape(pair)} ({m['units_each']} units each): pass share "
                      f"{100 * m['a']['pass_share']:.1f}% vs {100 * m['b']['pass_share']:.1f}%, distinct terms "
                      f"{m['a']['distinct_terms']} vs {m['b']['distinct_terms']}</li>" for pair, m in summary["matched"].items())
    matched_random = "".join(
        f"<li>{html.escape(pair)} ({r['units_each']} units each, {r['draws']} draws): pass share "
        f"{100 * r['a']['pass_share_mean']:.1f}% &plusmn; {100 * r['a']['pass_share_sd']:.1f} vs "
        f"{100 * r['b']['pass_share_mean']:.1f}% &plusmn; {100 * r['b']['pass_share_sd']:.1f}, distinct terms "
        f"{r['a']['distinct_terms_mean']:.1f} &plusmn; {r['a']['distinct_terms_sd']:.1f} vs "
        f"{r['b']['distinct_terms_mean']:.1f} &plusmn; {r['b']['distinct_terms_sd']:.1f}</li>"
        for pair, r in summary.get("matched_random", {}).items())
    own_size = "".join(
        f"<li>{html.escape(name)} ({c['units']} units): distinct terms {c['distinct_terms']} vs "
        f"{c['baseline_distinct_terms']} for a random dictionary of its size, pass share {100 * c['pass_share']:.1f}% "
        f"vs {100 * c['baseline_pass_share']:.1f}%</li>" for name, c in evaluation.get("random_dictionary", {}).items())
    training = summary["training"]["sae"]
    floor_state = "within" if evaluation["nulls_within_limit"] else "above"
    body = (
        f"<h1>sae-engine demo report</h1><p>{html.escape(summary['model'])}</p>"
        f"<p>{summary['proteins']} human proteins (a seeded random sample of 50-1000 residues; "
        f"{evaluation['discovery_proteins']} for discovery, {evaluation['heldout_proteins']} held out). "
        + (f"The SAEs trained on {summary['training_corpus']['proteins']} other Swiss-Prot proteins (none shares an "
           "accession or a sequence with a human protein). " if "training_corpus" in summary else "")
        + f"Residue-level "
        f"SAE: {training.get('steps')} steps, held-out FVU {training.get('eval_fvu', float('nan')):.3f}, dead latents "
        f"{100 * training.get('dead_fraction', 0):.1f}%.</p>"
        "<h2>Held-out, controlled GO evaluation</h2>"
        "<p>Each unit's activation is residualized on log length and the 20 amino-acid fractions; its best GO term "
        "and F1-maximizing threshold are chosen on discovery proteins; it passes when, on held-out proteins, F1 "
        "&ge; 0.5 and its top proteins are still enriched for the term (q &le; 0.05). Null families (grey) are "
        "scored by the same code. Composition units and permuted labels know nothing beyond what the controls "
        f"remove: their best pass share, {100 * evaluation['false_pass_floor']:.1f}%, is the false-pass floor "
        f"({floor_state} the {100 * evaluation['floor_limit']:.0f}% limit; dashed). Random directions of ESM2's "
        "activation space know what that space knows: they are the baseline of a random dictionary, and the "
        "last column compares every family with the best null, random directions included.</p>"
        + _family_table(evaluation)
        + "<img src='pass.png' alt='pass share and distinct terms per family'>"
        + (f"<h2>Against a random dictionary of the same size</h2><p>Random unit directions of the activation "
           f"space, as many as the family has units, ReLU'd and pooled as the family is.</p><ul>{own_size}</ul>"
           if own_size else "")
        + f"<h2>At matched counts</h2><p>Equal-size subsets matched by activation frequency (which picks a "
          f"sparse family's densest units):</p><ul>{matched}</ul>"
        + (f"<p>Random subsets of the larger family (mean &plusmn; sd over the draws):</p><ul>{matched_random}</ul>"
           if matched_random else "")
        + "<h2>Training</h2><img src='curves.png' alt='training curves' style='max-width:100%'>"
        + "<h2>Passing SAE features</h2><p>Ordered by held-out F1; one feature per GO term, with the number of "
          "other passing features whose best term is the same.</p>"
        + (_table(["feature", "GO id", "term", "namespace", "held-out F1", "held-out q", "others with this term"],
                  index_rows) if index_rows
           else "<p>No SAE feature passed the held-out test (try more proteins: <code>--proteins</code>).</p>")
    )
    index = out / "index.html"
    index.write_text(_page("sae-engine demo report", body))
    return index


def _feature_page(out, name, row, acts, pfam, names, annotations, go_names, sae, residues) -> None:
    column = int(row["unit"])
    values = acts.max[:, column].toarray().ravel()
    _histogram(values[values > 0], out / "features" / f"{name}_hist.png")
    top = np.argsort(-values)[:TOP_PROTEINS]
    protein_rows = []
    for p in top:
        if values[p] <= 0:
            break
        protein = acts.ids[p]
        named = [f"{g} ({html.escape(go_names[g])})" if g in go_names else g for g in annotations.get(protein, [])[:6]]
        protein_rows.append([html.escape(protein), html.escape(names.get(protein, "-")), f"{values[p]:.3f}",
                             html.escape(", ".join(pfam.get(protein, [])) or "-"), ", ".join(named) or "-"])
    track = ""
    if len(top) and values[top[0]] > 0 and acts.ids[top[0]] in residues:
        protein = acts.ids[top[0]]
        code_values, code_indices = sae.encode(torch.from_numpy(np.array(residues[protein], dtype=np.float32)))
        per_residue = (code_values.float() * (code_indices == column)).sum(dim=1).numpy()
        _track(per_residue, protein, out / "features" / f"{name}_track.png")
        track = f"<h2>Per-residue activation in {html.escape(protein)}</h2><img src='{name}_track.png'>"
    stats = _table(["GO id", "term", "namespace", "discovery q", "threshold", "discovery F1", "held-out F1",
                    "held-out q", "R² on length + composition", "active on"],
                   [[html.escape(row["go_id"]), html.escape(row["go_name"]), row["namespace"], row["discovery_q"],
                     row["threshold"], row["discovery_f1"], row["heldout_f1"], row["heldout_q"], row["r2"],
                     f"{100 * float(row['frequency']):.1f}% of proteins"]])
    body = (
        f"<p><a href='../index.html'>index</a></p><h1>Feature {name}</h1>"
        "<h2>Held-out GO term</h2>" + stats
        + f"<h2>Activation over proteins</h2><img src='{name}_hist.png'>"
        + "<h2>Top proteins</h2>" + _table(["protein", "gene: name", "max activation", "Pfam", "GO terms"], protein_rows)
        + track
    )
    (out / "features" / f"{name}.html").write_text(_page(f"feature {name}", body))
