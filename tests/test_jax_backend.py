"""The JAX backend against the PyTorch backend: same start, same batches, same results."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("jax")

from sae_engine.checkpoint import latest_checkpoint, load_checkpoint  # noqa: E402
from sae_engine.config import load_config  # noqa: E402
from sae_engine.jax_backend import JaxSAE  # noqa: E402
from sae_engine.torch_backend import TorchSAE  # noqa: E402
from sae_engine.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = ["model.d_in=16", "model.n_latents=96", "model.k=4", "model.dead_tokens=64", "train.precision='fp32'"]


def _pair(*extra: str) -> tuple[TorchSAE, JaxSAE]:
    config = load_config(None, BASE + list(extra))
    ours = TorchSAE(config, torch.device("cpu"))
    sample = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    ours.initialize(sample, sample)
    theirs = JaxSAE(config)
    theirs.load_state_tensors(ours.state_tensors(), ours.adam_count, ours.aux_active)
    return ours, theirs


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.optimizer='row_sparse_adam'"],
        ["model.kind='batchtopk'", "model.multi_topk=false"],
        ["model.multi_topk=true", "train.grad_clip=0.05"],
    ],
)
def test_fifty_steps_agree_with_the_torch_backend(extra):
    """Losses within 1e-4 relative each step; every state tensor within 1e-4 after 50 steps."""
    ours, theirs = _pair(*extra)
    g = torch.Generator().manual_seed(1)
    for step in range(50):
        x = torch.randn(64, 16, generator=g)
        lr = 1e-3 * min(1.0, (step + 1) / 5)
        a, b = ours.train_step(x, x, lr), theirs.train_step(x, x, lr)
        for key in ("loss", "fvu", "aux_loss", "l0"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-6), (step, key)
        if step % 10 == 9:
            assert ours.latent_stats(640) == pytest.approx(theirs.latent_stats(640))
    assert ours.aux_active  # AuxK was exercised
    ours_state, theirs_state = ours.state_tensors(), theirs.state_tensors()
    assert ours_state.keys() == theirs_state.keys()
    for name, tensor in ours_state.items():
        other = theirs_state[name]
        assert other.shape == tensor.shape and other.dtype == tensor.dtype, name
        assert torch.allclose(other.double(), tensor.double(), rtol=1e-4, atol=1e-5), name


def test_a_run_started_in_torch_resumes_in_jax(tmp_path):
    common = BASE + ["data.synthetic.tokens=3200", "data.buffer_size=512", "data.eval_tokens=128",
                     "train.batch_size=64", "train.checkpoint_every=10", "train.progress=false",
                     f"train.out_dir='{tmp_path / 'run'}'"]
    first = train(load_config(None, common + ["train.max_tokens=1280"]))  # 20 steps in torch
    assert first.step == 20
    second = train(load_config(None, common + ["train.backend='jax'", "train.device='cpu'"]))
    assert second.step == 50
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert meta["step"] == 50 and meta["adam_count"] == 50
    assert torch.isfinite(tensors["param.W_enc"]).all()
    assert second.final["fvu"] < 1.0


def test_data_parallel_over_four_host_devices_equals_one_device():
    script = textwrap.dedent(
        """
        import numpy as np, torch, jax
        from jax.sharding import Mesh
        from sae_engine.config import load_config
        from sae_engine.jax_backend import JaxSAE, shard_batch
        assert len(jax.devices()) == 4
        config = load_config(None, %r)
        single, sharded = JaxSAE(config), JaxSAE(config)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        g = torch.Generator().manual_seed(2)
        for _ in range(10):
            x = torch.randn(64, 16, generator=g)
            a = single.train_step(x, x, 1e-3)
            xs = shard_batch(jax.numpy.asarray(x.numpy()), mesh)
            b = sharded.train_step_arrays(xs, xs, 1e-3)
            assert len(xs.sharding.device_set) == 4
            assert abs(float(a["loss"]) - float(b["loss"])) <= 1e-5 * abs(float(a["loss"])), (a, b)
        for name in single.params:
            np.testing.assert_allclose(np.asarray(single.params[name]), np.asarray(sharded.params[name]), rtol=1e-5, atol=1e-6)
        print("ok")
        """
    ) % (BASE,)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
