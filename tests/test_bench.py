"""``sae-engine bench SUITE``: every suite's command line at tiny sizes prints one valid JSON object
that names the CPU with its features, measures what it says, and fails clearly on bad input."""
from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from sae_engine.benchmarks import train_step
from sae_engine.benchmarks.harness import InProcess, Worker
from sae_engine.cli import main as cli_main
from sae_kernels.hardware import cpu_info

TINY_STEP = ["--d-in", "16", "--n-latents", "64", "--k", "4", "--batch", "32", "--steps", "2", "--warmup", "1",
             "--peers", "none", "--device", "cpu"]


def bench_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    """Run ``sae-engine bench ARGV --json``; its stdout parsed (it must be exactly one JSON object)."""
    assert cli_main(["bench", *argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    machine = result["machine"]
    assert machine["cpu"] == cpu_info().describe() and machine["cpu_features"] == cpu_info().features
    assert machine["auto_precision"] in ("bf16", "fp32") and machine["torch"]
    return result


def test_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "kernels", "--shape", "64,16,256,4", "--device", "cpu", "--peers", "none",
                        "--repeats", "2", "--in-process")
    assert result["suite"] == "kernels"
    rows = {(r["group"], r["case"], r["dtype"]): r for r in result["rows"]}
    expected = {(g, c, dt) for g, cases in (("encoder", ("gemm", "gemm_chunked", "torch_topk", "sae_kernels")),
                                            ("decoder", ("embedding_bag", "sae_kernels")),
                                            ("backward", ("torch", "sae_kernels"))) for c in cases
                for dt in ("float32", "bfloat16")}
    assert set(rows) == expected
    for row in rows.values():
        assert row["shape"] == "B=64 d=16 n=256 k=4" and len(row["times_s"]) == 2 and row["time_s"] > 0, row
    assert rows["encoder", "gemm", "float32"]["ratio"] == 1.0
    # Each group: ours at its faster dtype against every other case at its own, and what auto costs.
    summary = {entry["group"]: entry for entry in result["faster_settings"]}
    assert set(summary) == {"encoder", "decoder", "backward"}
    for entry in summary.values():
        assert entry["auto_dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[result["machine"]["auto_precision"]]
        assert entry["auto_over_best"] >= 1.0 and entry["ours_vs_best_of"]
    assert any(line.startswith(("PASS", "FAIL")) for line in result["targets"])


def test_train_step_settings(capsys: pytest.CaptureFixture[str]) -> None:
    result = bench_json(capsys, "train-step", *TINY_STEP, "--in-process")
    rows = {(r["contender"], r["precision"]): r for r in result["rows"]}
    auto = result["machine"]["auto_precision"]
    assert set(rows) == {("ours", "auto"), ("ours", "bf16"), ("ours", "fp32"), ("gemm", auto)} | {("gemm", "bf16"), ("gemm", "fp32")}
    assert rows["ours", "auto"]["compute_dtype"] == auto
    for (contender, _), row in rows.items():
        assert len(row["times_s"]) == 2 and row["step_s"] > 0 and row["over_gemm"] > 0
        if contender == "ours":
            assert row["loss_last"] < row["loss_first"], row
    default = result["default_vs_faster"]
    fastest = min(rows["ours", "bf16"]["step_s"], rows["ours", "fp32"]["step_s"])
    assert default["auto_over_faster"] == pytest.approx(rows["ours", "auto"]["step_s"] / fastest)
    assert default["within_10_percent"] == (default["auto_over_faster"] <= 1.10)
    assert result["headline"]["precision"] == "auto" and result["peers"] == {}


def test_contender_in_its_own_process() -> None:
    """A contender set up in a spawned process reports its own peak memory and times on request."""
    spec = train_step.Spec(d_in=16, n_latents=1024, k=4, batch=1024, device="cpu", backend="torch")
    worker = Worker(train_step._setup_contender, train_step.Case("gemm", "fp32"), spec, 1)
    try:
        peak, step_mem, first_loss = worker.ready
        seconds, loss = worker.run()
        assert worker.proc.is_alive()
    finally:
        worker.close()
    assert not worker.proc.is_alive()
    assert peak >= 4 * 2**20  # at least its [1024, 1024] fp32 output buffer, built in that process
    assert step_mem >= 0 and first_loss is None and loss is None and seconds > 0


def test_failed_setup_names_the_cause() -> None:
    spec = train_step.Spec(d_in=16, n_latents=0, k=4, batch=32, device="cpu", backend="torch")
    with pytest.raises(RuntimeError, match="n_latents"):
        InProcess(train_step._setup_contender, train_step.Case("ours", "fp32", "adam"), spec, 1)


def test_train_step_jax_missing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "sae_engine.training.jax_backend", None)  # as if the module did not exist
    assert cli_main(["bench", "train-step", *TINY_STEP, "--backend", "jax", "--json"]) != 0
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "not available yet" in lines[0]


def test_esm(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("esm")
    result = bench_json(capsys, "esm", "--model", "random:1,16,2", "--random-sequences", "--proteins", "3",
                        "--layers", "1", "--contenders", "fair-esm,fair-esm-bf16,ours-fp32,ours-bf16",
                        "--accuracy-proteins", "2", "--in-process")
    rows = {r["contender"]: r for r in result["throughput"]}
    assert set(rows) == {"fair-esm", "fair-esm-bf16", "ours-fp32", "ours-bf16"}
    assert all(r["residues_per_s"] > 0 for r in rows.values())
    # The baseline is fair-esm at its faster setting: that one is 1.0x, the other at most that.
    assert max(rows["fair-esm"]["speedup"], rows["fair-esm-bf16"]["speedup"]) == 1.0
    assert result["auto_vs_faster"]["auto"] == f"ours-{result['machine']['auto_precision']}"
    assert result["accuracy"]["ours-fp32_L1_max_abs"] < 1e-4
    assert 0 < result["accuracy"]["ours-bf16_L1_rel_fro"] < 5e-2


def test_enrich(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("scipy")
    goatools = pytest.importorskip("goatools")
    result = bench_json(capsys, "enrich", "--proteins", "200", "--features", "20", "--terms", "2000",
                        "--goatools-features", "1")
    assert result["features"] == 20 and result["pairs_tested"] > 0
    assert result["total_cpu_s"] > 0 and set(result["stages"]) == {"propagate", "study_sets", "enrich"}
    assert goatools and result["goatools_cpu_ms_per_feature"] > 0 and result["speedup_per_feature"] > 0


def test_missing_extra_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delitem(sys.modules, "sae_engine.benchmarks.enrichment", raising=False)
    monkeypatch.setitem(sys.modules, "scipy", None)  # as if scipy were not installed
    monkeypatch.setitem(sys.modules, "scipy.sparse", None)
    assert cli_main(["bench", "enrich", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ("sae-engine bench enrich: error: needs the 'analysis' extra (module 'scipy' is "
                                                "missing): pip install 'sae-engine[analysis]'\n")


def test_bad_shape_names_the_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "kernels", "--shape", "64,16,256"])
    assert exit_info.value.code == 2
    assert "--shape '64,16,256': expected small, target or B,d,n,k" in capsys.readouterr().err
