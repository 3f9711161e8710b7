"""The demo pipeline end to end on the prepared real data (skipped when it was not prepared)."""
from __future__ import annotations

import json

import pytest

from sae_engine.esm.prepare import data_dir

PREPARED = (data_dir() / "human.fasta").exists() and (data_dir() / "go.sqlite").exists()


pytestmark = pytest.mark.skipif(not PREPARED, reason="real data not prepared: run `sae-engine data prepare`")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from sae_engine.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, run_demo(out, proteins=150, n_latents=512)


def test_demo_on_real_human_proteins(demo):
    out, summary = demo
    assert "fine-tuned" in summary["model"] and summary["proteins"] == 150
    assert summary["training"]["steps"] > 0 and summary["training"]["eval_fvu"] < 1.0
    for name in ("sae", "neurons"):
        shares = summary[name]
        assert 0 < shares["features_tested"] and 0.0 <= shares["any"] <= 1.0
        assert shares["any"] >= max(shares["BP"], shares["MF"], shares["CC"])
    table = (out / "sae_enrichment.tsv").read_text().splitlines()
    assert table[0].startswith("feature\tgo_id\tgo_name") and len(table) > 1
    assert json.loads((out / "summary.json").read_text()) == summary


def test_report_renders_in_headless_chromium(demo, tmp_path):
    import shutil
    import subprocess

    out, _ = demo
    index = out / "report" / "index.html"
    text = index.read_text()
    assert "fine-tuned" in text and "ESM2 neurons" in text and "features/f" in text
    pages = sorted((out / "report" / "features").glob("f*.html"))
    assert pages and "Enriched GO terms" in pages[0].read_text() and "Top proteins" in pages[0].read_text()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (bash .ci/install installs it as root)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", index.as_uri()], capture_output=True, text=True, timeout=120)
    assert "Most strongly enriched features" in dom.stdout and "<img" in dom.stdout
    shot = tmp_path / "index.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", index.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
