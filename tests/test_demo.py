"""The demo: a seeded sample, and the pipeline end to end on the prepared real data (skipped when
it was not prepared)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_engine.apps.demo import sample_proteins
from sae_engine.esm.prepare import data_dir

PREPARED = (data_dir() / "human.fasta").exists() and (data_dir() / "go.sqlite").exists()
needs_data = pytest.mark.skipif(not PREPARED, reason="real data not prepared: run `sae-engine data prepare`")
FIXTURE_FASTA = Path(__file__).parent / "data" / "go" / "population.fasta"
FAMILIES = {"sae", "protein_sae", "neurons", "neurons_topk"}


def test_the_sample_is_seeded_stable_and_within_the_length_range():
    first = sample_proteins(FIXTURE_FASTA, 60, seed=0)
    again = sample_proteins(FIXTURE_FASTA, 60, seed=0)
    other = sample_proteins(FIXTURE_FASTA, 60, seed=1)
    assert [r.id for r in first] == [r.id for r in again] != [r.id for r in other]
    assert all(50 <= len(r.sequence) <= 1000 for r in first) and len({r.id for r in first}) == 60
    population = [line.split()[0][1:] for line in FIXTURE_FASTA.read_text().splitlines() if line.startswith(">")]
    positions = [population.index(r.id) for r in first]
    assert positions == sorted(positions) and positions != list(range(60))  # file order, not the first 60
    with pytest.raises(ValueError, match="asked for 1000 proteins"):
        sample_proteins(FIXTURE_FASTA, 1000)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sae_engine.apps.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, proteins=300, n_latents=512)


@needs_data
def test_demo_evaluates_every_family_beside_the_nulls(demo):
    out, summary = demo
    assert "fine-tuned" in summary["model"] and summary["proteins"] == 300
    # trained apart from what it judges: no training protein is human, by accession or by sequence
    from sae_engine.esm.fasta import read_fasta

    human = list(read_fasta(data_dir() / "human.fasta"))
    training = list(read_fasta(out / "training.fasta"))
    assert len(training) == summary["training_corpus"]["proteins"] == 300
    assert not {r.id for r in training} & {r.id for r in human}
    assert not {r.sequence for r in training} & {r.sequence for r in human}
    assert json.loads((out / "sae" / "config.json").read_text())["data"]["esm"]["store"] == str(out / "training_store")
    assert summary["training"]["sae"]["steps"] > 0 and summary["training"]["sae"]["eval_fvu"] < 1.0
    assert summary["training"]["protein_sae"]["steps"] > 0
    evaluation = summary["evaluation"]
    assert set(evaluation["families"]) == FAMILIES
    assert set(evaluation["nulls"]) == {"random_directions", "composition", *(f"permuted_labels:{f}" for f in FAMILIES),
                                        *(f"random_dictionary:{f}" for f in ("sae", "protein_sae", "neurons"))}
    for name in ("sae", "protein_sae", "neurons"):  # a random dictionary of each family's own size
        assert evaluation["nulls"][f"random_dictionary:{name}"]["units"] == evaluation["families"][name]["units"]
        assert evaluation["random_dictionary"][name]["units"] == evaluation["families"][name]["units"]
    assert evaluation["families"]["neurons"]["units"] == 640 and evaluation["nulls"]["random_directions"]["units"] == 320
    assert evaluation["discovery_proteins"] + evaluation["heldout_proteins"] == 300
    for family in [*evaluation["families"].values(), *evaluation["nulls"].values()]:
        assert 0 <= family["passing"] <= family["units"] and family["distinct_terms"] <= family["passing"]
    # The calibration: no label-free null passes more than the floor allows. (Random directions
    # are a baseline, not part of the floor: in ESM2's space they find kinases and GPCRs too.)
    label_free = [n["pass_share"] for name, n in evaluation["nulls"].items()
                  if name != "random_directions" and not name.startswith("random_dictionary:")]
    assert evaluation["nulls_within_limit"] and max(label_free) <= 0.05, evaluation["nulls"]
    assert evaluation["best_null_pass_share"] >= max(label_free)
    assert set(summary["matched"]) == {"sae vs neurons", "protein_sae vs neurons", "neurons_topk vs neurons"}
    assert set(summary["matched_random"]) == set(summary["matched"])
    subsets = summary["matched_random"]["sae vs neurons"]
    # the 512 SAE latents whole, against five random 512-subsets of the 640 neurons
    assert subsets["units_each"] == 512 and len(subsets["a"]["distinct_terms"]) == 1
    assert len(subsets["b"]["distinct_terms"]) == 5 and subsets["a"]["distinct_terms_sd"] == 0.0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert json.loads((out / "evaluation" / "evaluation.json").read_text()) == evaluation
    table = (out / "evaluation" / "units" / "sae.tsv").read_text().splitlines()
    assert table[0].startswith("unit\tfrequency\tr2\tgo_id") and len(table) == 513


@needs_data
def test_report_renders_in_headless_chromium(demo, tmp_path):
    import shutil
    import subprocess

    out, _ = demo
    index = out / "report" / "index.html"
    text = index.read_text()
    assert "fine-tuned" in text and "null: composition" in text and "At matched counts" in text
    assert "Random subsets of the larger family" in text and "random dictionary of the same size" in text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (bash .ci/install installs it as root)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Held-out, controlled GO evaluation" in dom.stdout and "<img" in dom.stdout
    shot = tmp_path / "index.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", index.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
