"""``sae-engine bench train-step``: the JSON fields at a tiny shape, and the JAX-missing error."""
from __future__ import annotations

import json
import sys

import pytest

from sae_engine import bench_train

TINY = ["--d-in", "16", "--n-latents", "64", "--k", "4", "--batch", "32", "--steps", "2", "--warmup", "1",
        "--peers", "none", "--device", "cpu"]


def test_json_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_train.main([*TINY, "--optimizer", "row_sparse_adam", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens_per_s"] > 0 and result["peak_mem_mib"] > 0
    assert result["gemm_ms"] > 0 and result["step_over_gemm"] > 0
    assert result["optimizer"] == "row_sparse_adam" and result["spec"]["n_latents"] == 64
    assert result["peers"] == {}
    assert [(r["contender"], r["setting"]) for r in result["rows"]] == [("ours", "row_sparse_adam"), ("gemm", "bfloat16")]
    for row in result["rows"]:
        assert len(row["times_s"]) == 2 and row["step_s"] > 0 and row["peak_mem_bytes"] >= 0
    ours = result["rows"][0]
    assert ours["loss_last"] < ours["loss_first"]


def test_jax_backend_missing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sae_engine.jax_backend", None)  # as if the module did not exist
    assert bench_train.main([*TINY, "--backend", "jax", "--json"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "not available yet" in lines[0]
