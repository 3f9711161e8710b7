"""The JAX mesh: sharded selection equals one device bit for bit on the indices (values and
decoding within fp32 rounding), on 4 host devices in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from sae_kernels import jax as kj
    from sae_engine.parallel.jax_sharded import make_mesh, sharded_decode, sharded_topk
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    ints = lambda *shape, lo=-1, hi=2: jnp.asarray(rng.integers(lo, hi, shape), jnp.float32)
    # One shape for every case (one compilation per mesh); k = 20 exceeds a shard's 16 rows at L = 4.
    few = np.zeros(61, bool); few[[3, 4, 40, 59]] = True
    every = jnp.ones(61, bool)
    cases = {
        "random": (jnp.asarray(rng.standard_normal((32, 16)), jnp.float32), jnp.asarray(rng.standard_normal((61, 16)), jnp.float32),
                   jnp.asarray(rng.standard_normal(61), jnp.float32), every),
        "ties": (ints(32, 16), ints(61, 16), ints(61), every),
        "negative": (ints(32, 16), ints(61, 16), ints(61, lo=-40, hi=-30), every),
        "fewer-than-k": (ints(32, 16), ints(61, 16), ints(61), jnp.asarray(few)),
    }
    k = 20
    for data, latent in ((1, 4), (2, 2)):  # L = 4 and 2 (with data rows split)
        mesh = make_mesh(data, latent)
        for name, (x, W, b, m) in cases.items():
            want_v, want_i = kj.topk_encode(x, W, b, k, latent_mask=m)
            values, indices = sharded_topk(x, W, b, k, mesh, latent_mask=m)
            where = f"{name} at {data}x{latent}"
            assert np.array_equal(np.asarray(indices), np.asarray(want_i)), where
            # XLA blocks a GEMM by its shape: a shard's pre-activations may round differently.
            np.testing.assert_allclose(np.asarray(values), np.asarray(want_v), rtol=1e-5, atol=1e-5, err_msg=where)
            recon = sharded_decode(values, indices, W, mesh)
            np.testing.assert_allclose(np.asarray(recon), np.asarray(kj.sparse_decode(want_v, want_i, W)), rtol=1e-5, atol=1e-5, err_msg=where)
    print("ok")
""")


def test_jax_mesh_selection_equals_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
