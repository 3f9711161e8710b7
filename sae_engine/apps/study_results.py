"""A study's results: ``study.json``, ``study.tsv`` and the report page with its curves."""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..atomic import write_text

TSV_COLUMNS = ("variant", "level", "kind", "n_latents", "k", "layer", "scale", "concepts", "family", "units",
               "passing", "pass_share", "distinct_concepts", "median_f1", "false_pass_floor",
               "matched_units", "matched_sae_concepts_mean", "matched_sae_concepts_sd", "matched_neuron_concepts",
               "matched_sae_pass_mean", "matched_neuron_pass", "freq_matched_sae_concepts", "freq_matched_neuron_concepts",
               "train_tokens", "eval_fvu", "dead_fraction")
FAMILIES = ("sae", "neurons", "random_directions", "random_dictionary")
NULLS = ("composition", "permuted_labels")


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def tsv_rows(study: dict) -> list[list[str]]:
    """One row per (variant, layer, scale, concept set, family); the matched-count columns on SAE rows."""
    rows = []
    for p in study["points"]:
        t = p["training"]
        for concept, c in p["concepts"].items():
            groups = [(name, c["families"][name]) for name in FAMILIES] + [(name, c["nulls"][name]) for name in NULLS]
            for name, s in groups:
                matched = [None] * 8
                if name == "sae":
                    r, f = c["vs_neurons_random_subsets"], c["vs_neurons_frequency_matched"]
                    matched = [r["units_each"], r["a"]["distinct_terms_mean"], r["a"]["distinct_terms_sd"],
                               r["b"]["distinct_terms_mean"], r["a"]["pass_share_mean"], r["b"]["pass_share_mean"],
                               f["a"]["distinct_terms"], f["b"]["distinct_terms"]]
                rows.append([_cell(v) for v in (
                    p["variant"], p["level"], p["kind"], p["n_latents"], p["k"], p["layer"], p["scale"], concept, name,
                    s["units"], s["passing"], s["pass_share"], s["distinct_terms"], s["median_f1"], c["false_pass_floor"],
                    *matched, t.get("tokens"), t.get("eval_fvu"), t.get("dead_fraction"))])
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves(study: dict, out: Path) -> None:
    """Distinct concepts and pass share against training proteins, one column per concept set:
    a line per (variant, layer); neurons, random directions and the variant's random dictionary
    as horizontal lines; the nulls' floor as a grey band."""
    plt = _plt()
    concepts = list(study["evaluation"]["concepts"])
    fig, axes = plt.subplots(2, len(concepts), figsize=(6 * len(concepts), 8), squeeze=False)
    series: dict[tuple[str, int], list[dict]] = {}
    for p in study["points"]:
        series.setdefault((p["variant"], p["layer"]), []).append(p)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, concept in enumerate(concepts):
        for row, (key, label) in enumerate((("distinct_terms", "distinct concepts of passing units"),
                                            ("pass_share", "pass share (held out)"))):
            ax = axes[row][col]
            floor = 0.0
            drawn_baselines: set[str] = set()
            for i, ((variant, layer), points) in enumerate(sorted(series.items())):
                points = sorted(points, key=lambda q: q["scale"])
                colour = colours[i % len(colours)]
                scale = [q["scale"] for q in points]
                value = [q["concepts"][concept]["families"]["sae"][key] * (100 if key == "pass_share" else 1)
                         for q in points]
                ax.plot(scale, value, "o-", color=colour, label=f"{variant} (layer {layer})")
                last = points[-1]["concepts"][concept]
                floor = max(floor, *(q["concepts"][concept]["false_pass_floor"] for q in points))
                scale_of = 100 if key == "pass_share" else 1
                ax.axhline(last["families"]["random_dictionary"][key] * scale_of, color=colour, ls=":", lw=1,
                           label=f"random dictionary of {points[-1]['n_latents']}")
                for name, style in (("neurons", "--"), ("random_directions", "-.")):
                    tag = f"{name}:{points[-1]['level']}:{layer}"
                    if tag in drawn_baselines:
                        continue
                    drawn_baselines.add(tag)
                    grey = "black" if points[-1]["level"] == "residue" else "grey"
                    ax.axhline(last["families"][name][key] * scale_of, color=grey, ls=style, lw=1,
                               label=f"{name.replace('_', ' ')} ({points[-1]['level']}, layer {layer})")
            if key == "pass_share":
                ax.axhspan(0, 100 * floor, color="grey", alpha=0.25, label="nulls' floor")
            ax.set_xscale("log")
            ax.set_xlabel("training proteins")
            ax.set_ylabel(label)
            ax.set_title(f"{concept}: {label}")
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _page(study: dict, rows: list[list[str]], partial: bool) -> str:
    corpus = study["corpus"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in TSV_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    state = " (in progress: the points finished so far)" if partial else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sae-engine study</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>SAE features against ESM2 neurons, by training corpus size{state}</h1>
<p>Model: {html.escape(study['model'])}</p>
<p>Training corpus: nested seeded samples of {html.escape(corpus['fasta'])} ({corpus['eligible']:,} eligible proteins;
{corpus['excluded_by_accession']:,} excluded by accession and {corpus['excluded_by_sequence']:,} by identical sequence to an
evaluation protein). Evaluation: {study['evaluation']['proteins']:,} proteins of {html.escape(corpus['evaluation_fasta'])},
held-out halves, controlled for length and composition; a unit passes with held-out F1 &ge; 0.5 and its held-out top
proteins enriched (q &le; 0.05).</p>
<img src="curves.png" alt="distinct concepts and pass share against training proteins">
<h2>Every point (study.tsv)</h2><table><tr>{head}</tr>{body}</table></body></html>"""


def write_results(out: Path, study: dict, partial: bool = False) -> None:
    """``study.json``, ``study.tsv`` and ``report/`` (index.html, curves.png), each written atomically."""
    out = Path(out)
    rows = tsv_rows(study)
    write_text(out / "study.tsv", "\t".join(TSV_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    if not partial:
        write_text(out / "study.json", json.dumps(study, indent=1, sort_keys=True))
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    if study["points"]:
        curves(study, report / "curves.png")
    write_text(report / "index.html", _page(study, rows, partial))
