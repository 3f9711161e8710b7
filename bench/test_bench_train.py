"""pytest-benchmark entry points for one training step: ``python -m pytest bench/test_bench_train.py --benchmark-only``.

Small shapes, in this process (the CLI, ``sae-engine bench train-step``, measures the real
sizes with peak memory in separate processes). Before timing, each contender must show that
it trains: its loss falls over a few steps on the same synthetic batch. Peers that are not
installed are skipped with the reason.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from sae_engine.benchmarks import train_step as bt
from sae_engine.benchmarks.harness import Unavailable, timed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = bt.Spec(d_in=64, n_latents=1024, k=16, batch=256, device=DEVICE, backend="torch")
CASES = [bt.Case("ours", p, opt) for opt in bt.OPTIMIZERS for p in bt.PRECISIONS] + [
    bt.Case(peer, setting) for peer in bt.PEERS for setting in bt.PEER_SETTINGS
]
TRAIN_STEPS = 3


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return bt.make_batch(SPEC)


@pytest.mark.parametrize("case", CASES, ids=[c.label.replace(" ", "-") for c in CASES])
def test_train_step(benchmark: Any, case: bt.Case, batch: torch.Tensor) -> None:
    try:
        step = bt.build_step(case, SPEC, batch)
    except Unavailable as err:
        pytest.skip(str(err))
    losses = [bt.loss_value(timed(step, DEVICE)[1]) for _ in range(TRAIN_STEPS)]
    assert losses[-1] < losses[0], f"{case.label} does not train: losses {losses}"
    benchmark.pedantic(lambda: timed(step, DEVICE), rounds=3, warmup_rounds=0, iterations=1)
