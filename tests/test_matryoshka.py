"""Matryoshka BatchTopK / TopK SAEs: the prefixes' config, one prefix is BatchTopK exactly,
sharded training equals one process, and a run killed with -9 resumes exactly. The gradients against dense autograd are in
test_torch_backend.py, the torch / JAX parity in test_backend_conformance.py, the JAX meshes in
test_parallel_jax_train.py (the "matryoshka" model of test_parallel_train's configs)."""
from __future__ import annotations

import random
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from sae_engine.checkpoints import latest_checkpoint
from sae_engine.config import ConfigError, default_prefixes, load_config
from sae_engine.parallel.launch import run_local
from sae_engine.training.backend import local_prefixes
from sae_engine.training.torch_backend import TorchSAE
from sae_engine.training.trainer import train
from test_parallel_train import _configs, _train_on_meshes, assert_equal_to_one_process
from test_trainer import LONG, _config, _launch, _wait_for_checkpoint

BASE = ["model.d_in=16", "model.n_latents=96", "model.k=4", "model.dead_tokens=32", "train.precision='fp32'"]


@pytest.mark.parametrize("prefixes, why", [
    ("[]", "must be a non-empty list of integers"),
    ("[0, 96]", "must be positive"),
    ("[8, 8, 96]", "must be strictly increasing"),
    ("[8, 32]", "must end at model.n_latents = 96"),
    ("[8, 2.5, 96]", "must be a non-empty list of integers"),
])
def test_bad_prefixes_get_one_clear_error(prefixes, why):
    with pytest.raises(ConfigError, match=re.escape(f"model.matryoshka_prefixes = {eval(prefixes)!r}: {why}")):
        load_config(None, BASE + ["model.kind='matryoshka_batchtopk'", f"model.matryoshka_prefixes={prefixes}"])


def test_prefixes_need_a_matryoshka_kind_and_default_to_quartering():
    with pytest.raises(ConfigError, match="model.matryoshka_prefixes = \\[8, 96\\]: needs a Matryoshka model.kind"):
        load_config(None, BASE + ["model.matryoshka_prefixes=[8, 96]"])
    config = load_config(None, BASE + ["model.kind='matryoshka_batchtopk'"])
    assert config.model.prefixes == default_prefixes(96) == [1, 6, 24, 96]
    assert default_prefixes(3) == [3] and default_prefixes(16384) == [256, 1024, 4096, 16384]
    assert load_config(None, BASE).model.prefixes == [96]


def test_local_prefixes_of_a_latent_shard():
    """A shard's rows [lo, hi) contribute to every prefix m_g > lo: its boundaries and their map."""
    assert local_prefixes([5, 23, 40], 0, 40) == ([5, 23, 40], [0, 1, 2])
    assert local_prefixes([5, 23, 40], 20, 40) == ([3, 20], [-1, 0, 1])  # the prefix of 23 straddles 20
    assert local_prefixes([5, 23, 40], 10, 20) == ([10], [-1, 0, 0])
    assert local_prefixes([5, 23, 40], 0, 10) == ([5, 10], [0, 1, 1])


def _steps(extra: list[str], steps: int = 12) -> tuple[list[dict], dict]:
    """Train a TorchSAE on fixed batches, statistics every 4 steps (AuxK runs once latents die)."""
    sae = TorchSAE(load_config(None, BASE + extra), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    sample = 3 + 2 * torch.randn(256, 16, generator=g)
    sae.initialize(sample, sample)
    metrics = []
    for step in range(steps):
        x = 3 + 2 * torch.randn(64, 16, generator=g)
        metrics.append({key: float(value) for key, value in sae.train_step(x, x, 1e-3).items()})
        if step % 4 == 3:
            sae.latent_stats(4 * 64)
    assert sae.aux_active
    return metrics, sae.state_tensors()


def test_one_prefix_is_batchtopk_exactly():
    want_metrics, want = _steps(["model.kind='batchtopk'"])
    got_metrics, got = _steps(["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[96]"])
    assert got_metrics == want_metrics
    assert all(torch.equal(got[name], tensor) for name, tensor in want.items())
    nested_metrics, _ = _steps(["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[4, 96]"])
    assert nested_metrics[-1]["loss"] != want_metrics[-1]["loss"]  # a second prefix changes the loss


def test_one_prefix_is_batchtopk_in_jax():
    pytest.importorskip("jax")
    from sae_engine.training.jax_backend import JaxSAE

    def run(extra):
        sae = JaxSAE(load_config(None, BASE + extra))
        g = torch.Generator().manual_seed(0)
        sae.initialize(*(2 * [3 + 2 * torch.randn(256, 16, generator=g)]))
        x = 3 + 2 * torch.randn(64, 16, generator=g)
        return [{key: float(value) for key, value in sae.train_step(x, x, 1e-3).items()} for _ in range(3)]

    want = run(["model.kind='batchtopk'"])
    got = run(["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[96]"])
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=1e-6)


def test_sharded_training_equals_one_process():
    """gloo, 2 processes: latents split 1x2 (the prefix of 23 straddles the ranks) and data 2x1."""
    configs = {"matryoshka": _configs()["matryoshka"]}
    meshes = [(1, 2), (2, 1)]
    results = run_local(_train_on_meshes, 2, meshes, configs, timeout=240)
    assert_equal_to_one_process(results, meshes, configs)


MATRYOSHKA = ["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[16, 64, 256]", "model.dead_tokens=512"]


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    train(_config(reference_dir, *LONG, *MATRYOSHKA))
    reference = load_file(str(latest_checkpoint(reference_dir / "run") / "model.safetensors"))

    process = _launch(tmp_path, *LONG, *MATRYOSHKA)
    _wait_for_checkpoint(tmp_path / "run", process)
    time.sleep(random.uniform(0.0, 0.5))  # any moment after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(tmp_path / "run").name

    result = train(_config(tmp_path, *LONG, *MATRYOSHKA))
    assert result.step == 300 and killed_at != "step_000000300"
    resumed = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert reference["buffer.batchtopk_threshold"] > 0
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
