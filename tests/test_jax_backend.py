"""The JAX backend: a run started in torch resumes in JAX; data parallelism over a mesh.

The step-by-step parity with the torch backend is in test_backend_conformance.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("jax")

from sae_engine.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from sae_engine.config import load_config  # noqa: E402
from sae_engine.training.trainer import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = ["model.d_in=16", "model.n_latents=96", "model.k=4", "model.dead_tokens=64", "train.precision='fp32'"]


def test_a_run_started_in_torch_resumes_in_jax(tmp_path):
    """20 steps in torch, 30 more in JAX from its checkpoint: the same parameters, Adam moments,
    latent statistics and data position as 50 uninterrupted torch steps (fp32; the tolerance
    of the step-by-step parity test in test_backend_conformance.py)."""
    common = BASE + ["data.synthetic.tokens=3200", "data.buffer_size=512", "data.eval_tokens=128",
                     "train.batch_size=64", "train.checkpoint_every=10", "train.progress=false"]
    resumed, whole = tmp_path / "resumed", tmp_path / "whole"
    first = train(load_config(None, common + ["train.max_tokens=1280", f"train.out_dir='{resumed}'"]))
    assert first.step == 20
    second = train(load_config(None, common + ["train.backend='jax'", f"train.out_dir='{resumed}'"]))
    reference = train(load_config(None, common + [f"train.out_dir='{whole}'"]))
    assert second.step == reference.step == 50
    got, got_meta = load_checkpoint(latest_checkpoint(resumed))
    want, want_meta = load_checkpoint(latest_checkpoint(whole))
    assert got_meta["adam_count"] == want_meta["adam_count"] == 50
    assert got_meta["buffer"] == want_meta["buffer"] and got_meta["aux_active"] == want_meta["aux_active"]
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        if name.startswith(("param.", "adam.")):
            assert torch.allclose(got[name], tensor, rtol=1e-4, atol=1e-5), name
        else:  # counters, scales, threshold and the buffer's unserved vectors
            assert torch.equal(got[name], tensor), name
    assert second.final["eval_fvu"] == pytest.approx(reference.final["eval_fvu"], rel=1e-4)


def test_data_parallel_over_four_host_devices_equals_one_device():
    script = textwrap.dedent(
        """
        import numpy as np, torch, jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from sae_engine.config import load_config
        from sae_engine.training.jax_backend import JaxSAE
        assert len(jax.devices()) == 4
        config = load_config(None, %r)
        single, sharded = JaxSAE(config), JaxSAE(config)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        g = torch.Generator().manual_seed(2)
        for _ in range(10):
            x = torch.randn(64, 16, generator=g)
            a = single.train_step(x, x, 1e-3)
            xs = jax.device_put(jax.numpy.asarray(x.numpy()), NamedSharding(mesh, PartitionSpec("data", None)))
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
