"""The demo pipeline end to end on the prepared real data (skipped when it was not prepared)."""
from __future__ import annotations

import json

import pytest

from sae_engine.esm.prepare import data_dir

PREPARED = (data_dir() / "human.fasta").exists() and (data_dir() / "go.sqlite").exists()


@pytest.mark.skipif(not PREPARED, reason="real data not prepared: run `sae-engine data prepare`")
def test_demo_on_real_human_proteins(tmp_path):
    from sae_engine.demo import run_demo

    summary = run_demo(tmp_path / "demo", proteins=60, n_latents=512)
    assert "fine-tuned" in summary["model"] and summary["proteins"] == 60
    assert summary["training"]["steps"] > 0 and summary["training"]["eval_fvu"] < 1.0
    for name in ("sae", "neurons"):
        shares = summary[name]
        assert 0 < shares["features_tested"] and 0.0 <= shares["any"] <= 1.0
        assert shares["any"] >= max(shares["BP"], shares["MF"], shares["CC"])
    table = (tmp_path / "demo" / "sae_enrichment.tsv").read_text().splitlines()
    assert table[0].startswith("feature\tgo_id\tgo_name")
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
