"""JumpReLU SAEs: the thresholds' pseudo-gradient against finite differences of the
kernel-smoothed loss, the L0 following its penalty, the row cap's overflow, sharded training
equal to one process, and a run killed with -9 resuming exactly."""
from __future__ import annotations

import random
import re
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from sae_engine.checkpoints import latest_checkpoint
from sae_engine.config import ConfigError, RunConfig, load_config
from sae_engine.parallel.launch import run_local
from sae_engine.training.backend import JUMPRELU_INIT_THRESHOLD, state_shapes
from sae_engine.training.torch_backend import TorchSAE
from sae_engine.training.trainer import train
from test_parallel_train import _train_on_meshes, assert_equal_to_one_process
from test_trainer import LONG, _config, _launch, _wait_for_checkpoint

D, N = 16, 96
BASE = [f"model.d_in={D}", f"model.n_latents={N}", "model.k=8", "model.dead_tokens=32", "train.precision='fp32'",
        "model.kind='jumprelu'"]


def _sparse_batch(g: torch.Generator, basis: torch.Tensor, rows: int) -> torch.Tensor:
    """Vectors made of a few of 24 non-negative features (about 16 % active each)."""
    return torch.relu(torch.randn(rows, basis.shape[0], generator=g) - 1.0) @ basis


def _rectangle_cdf(u: torch.Tensor) -> torch.Tensor:
    """The integral of the rectangle kernel K(u) = 1[|u| < 1/2]: the smoothed step."""
    return (u + 0.5).clamp(0.0, 1.0)


def test_threshold_gradient_is_the_finite_difference_of_the_smoothed_loss():
    """With K the rectangle kernel of width eps and R its integral, the smoothed loss is
    S(theta) = sum_b g_b . sum_i theta0_i R((pre_bi - theta_i) / eps) W_dec[i] + (l0_coef / N) sum_bi R(...):
    the reconstruction to first order in the jumping values (gradient g w.r.t. the prediction,
    the jump of a latent at its threshold theta0_i) and the kernel-density L0. Its exact gradient is
    the pseudo-gradient; R is piecewise linear, so central differences are exact up to rounding."""
    config = load_config(None, BASE + ["model.jumprelu_bandwidth=0.2", "model.l0_coef=0.05"])
    m = config.model
    sae = TorchSAE(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, D, generator=g)
    sae.params["threshold"].copy_(0.2 + 0.3 * torch.rand(N, generator=g))
    sae.params["threshold"][7] = 100.0  # no pre-activation near it: no gradient
    W_enc, b_enc, W_dec, theta0 = sae.params["W_enc"], sae.params["b_enc"], sae.params["W_dec"], sae.params["threshold"]
    g_recon = torch.randn(512, D, generator=g) / 512
    code = sae._threshold_code(x, W_enc, b_enc, band=True)
    assert not code.band_overflow.any() and code.band_counts.sum() > 100
    got = sae._threshold_grad(code, g_recon, torch.tensor(512.0))

    pre = (x @ W_enc.T + b_enc).double()  # [B, n], small here: the dense oracle
    eps = m.jumprelu_bandwidth
    dots = (g_recon.double() @ W_dec.double().T)  # g_b . W_dec[i]

    def smoothed(theta: torch.Tensor) -> torch.Tensor:
        r = _rectangle_cdf((pre - theta) / eps)
        return (dots * theta0.double() * r).sum() + m.l0_coef / 512 * r.sum()

    h = 1e-9  # below the distance of every entry to a band edge (float64 differences)
    assert torch.nonzero(got == 0).squeeze(1).tolist() == [7]
    for i in list(range(20)) + [7]:
        step = torch.zeros(N, dtype=torch.float64)
        step[i] = h
        want = (smoothed(theta0.double() + step) - smoothed(theta0.double() - step)) / (2 * h)
        assert float(got[i]) == pytest.approx(float(want), rel=1e-4, abs=1e-8), i  # the engine sums in fp32


def _train_l0(l0_coef: float, steps: int = 200) -> dict:
    config = load_config(None, BASE + [f"model.l0_coef={l0_coef}"])
    sae = TorchSAE(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(24, D, generator=g)
    sae.initialize(_sparse_batch(g, basis, 256), _sparse_batch(g, basis, 256))
    for step in range(steps):
        x = _sparse_batch(g, basis, 256)
        metrics = sae.train_step(x, x, 3e-3)
        if step % 10 == 9:
            sae.latent_stats(2560)
    x = _sparse_batch(g, basis, 1024)
    return {**{key: float(value) for key, value in metrics.items()}, **sae.evaluate(x, x),
            "threshold": float(sae.params["threshold"].mean())}


def test_the_l0_of_a_trained_model_follows_the_penalty():
    low, high = _train_l0(1e-3), _train_l0(3e-2)
    assert high["eval_l0"] < 0.5 * low["eval_l0"] and high["threshold"] > low["threshold"] > JUMPRELU_INIT_THRESHOLD
    assert low["eval_fvu"] < high["eval_fvu"] < 0.5  # the price of sparsity, and both still reconstruct


def test_the_row_cap_is_exact_and_its_overflow_counted():
    config = load_config(None, BASE + ["model.jumprelu_row_cap=3"])
    sae = TorchSAE(config, torch.device("cpu"))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1))
    sae.initialize(x, x)
    metrics = sae.train_step(x, x, 1e-3)
    values, indices = sae.encode(x)
    assert values.shape == (64, 3) and 0 < float(metrics["overflow"]) <= 1
    pre = (sae._encoder_input(sae._normalize_input(x)) @ sae.params["W_enc"].T + sae.params["b_enc"])
    active = pre > sae.params["threshold"]
    assert float(metrics["overflow"]) == pytest.approx(float((active.sum(1) > 3).float().mean()))
    # each row keeps its lowest-index active latents, in index order
    first = [torch.nonzero(row).squeeze(1)[:3] for row in active]
    assert all(torch.equal(indices[b][indices[b] >= 0], first[b]) for b in range(64))
    assert set(state_shapes(config.model)) == set(sae.state_tensors())


@pytest.mark.parametrize("extra, message", [
    (["model.jumprelu_bandwidth=0"], "model.jumprelu_bandwidth = 0: must be positive"),
    (["model.l0_coef=-1"], "model.l0_coef = -1: must be >= 0"),
    (["model.jumprelu_row_cap=0"], "model.jumprelu_row_cap = 0: must be a positive integer"),
    (["model.multi_topk=true"], "model.multi_topk = True: is defined for model.kind = 'topk'"),
])
def test_bad_jumprelu_settings_get_one_clear_error(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, BASE + extra)


# Split by latent like W_enc's rows; sae_engine.checkpoints.keys does not list them yet (ROW_PARAMS).
THRESHOLD_KEYS = ("param.threshold", "adam.m.threshold", "adam.v.threshold")


def _sharded_config() -> RunConfig:
    return RunConfig.from_dict({
        # no row over the cap (which applies per latent rank): the codes are then those of one process
        "model": {"d_in": 16, "n_latents": 38, "k": 4, "kind": "jumprelu", "dead_tokens": 64, "l0_coef": 0.01,
                  "jumprelu_bandwidth": 0.05, "jumprelu_row_cap": 38},
        "data": {"synthetic": {"tokens": 4096}, "buffer_size": 1024, "eval_tokens": 0},
        "train": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 0, "precision": "fp32", "device": "cpu",
                  "optimizer": "row_sparse_adam"}})


def test_sharded_training_equals_one_process():
    """gloo, 2 processes, latents split 1x2 and data 2x1: each rank codes its own latents."""
    configs = {"jumprelu": _sharded_config()}
    meshes = [(1, 2), (2, 1)]
    results = run_local(_train_on_meshes, 2, meshes, configs, timeout=240)
    assert_equal_to_one_process(results, meshes, configs, THRESHOLD_KEYS)


JUMPRELU = ["model.kind='jumprelu'", "model.l0_coef=0.01", "model.dead_tokens=512"]


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    train(_config(reference_dir, *LONG, *JUMPRELU))
    reference = load_file(str(latest_checkpoint(reference_dir / "run") / "model.safetensors"))

    process = _launch(tmp_path, *LONG, *JUMPRELU)
    _wait_for_checkpoint(tmp_path / "run", process)
    time.sleep(random.uniform(0.0, 0.5))  # any moment after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(tmp_path / "run").name

    result = train(_config(tmp_path, *LONG, *JUMPRELU))
    assert result.step == 300 and killed_at != "step_000000300"
    resumed = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert "param.threshold" in reference and not torch.equal(reference["param.threshold"],
                                                              torch.full((256,), JUMPRELU_INIT_THRESHOLD))
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name


def test_latent_split_runs_wait_for_checkpoints_that_split_the_thresholds():
    """The trainer's placements refuse latent-split JumpReLU runs while ``checkpoints.keys`` does
    not list the thresholds among the row parameters (their DCP / orbax files would be wrong)."""
    from sae_engine.checkpoints.keys import is_row_param
    from sae_engine.parallel.placements import jax_placement, torch_placement

    config = load_config(None, BASE + ["parallel.latent=2"])
    if is_row_param("param.threshold"):
        pytest.skip("the checkpoints split the thresholds by latent")
    for placement in (torch_placement, jax_placement):
        with pytest.raises(ConfigError, match="cannot split param.threshold by latent"):
            placement(config)
