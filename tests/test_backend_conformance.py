"""Every backend keeps the contract of ``sae_engine.training.backend`` (``SAEBackend``,
``SAEAnalysis``; JAX also ``ArrayBackend``), which lists what the trainer and the placements
use; torch and JAX agree.

The contract tests run once per backend; the parity tests start both backends from one state,
feed them the same batches and compare losses and every state tensor (fp32 compute).
"""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path
from typing import Protocol

import pytest
import torch

from sae_engine.training.backend import (EVAL_METRICS, LATENT_STATS, METRICS, ArrayBackend, SAEAnalysis, SAEBackend,
                                         code_width, state_shapes)
from sae_engine.config import ConfigError, load_config
from sae_engine.training.torch_backend import TorchSAE

PACKAGE = Path(__file__).resolve().parent.parent / "sae_engine"

D_IN, D_OUT, N, B = 16, 12, 96, 64
BASE = [f"model.d_in={D_IN}", f"model.n_latents={N}", "model.k=4", "model.dead_tokens=32", "train.precision='fp32'"]
# One set of configurations for every test: JAX compiles a step once per configuration.
VARIANTS = {
    "topk-adam": [],
    "batchtopk-rowsparse-layernorm": ["model.kind='batchtopk'", "model.normalize='layernorm'",
                                      "train.optimizer='row_sparse_adam'"],
    "transcoder-multitopk-clipped": [f"model.d_out={D_OUT}", "model.skip_connection=true", "model.multi_topk=true",
                                     "train.grad_clip=0.05"],
    "matryoshka-batchtopk": ["model.kind='matryoshka_batchtopk'", "model.matryoshka_prefixes=[6, 30, 96]"],
    "jumprelu": ["model.kind='jumprelu'", "model.l0_coef=0.01", "model.jumprelu_bandwidth=0.05"],
}
BACKENDS = ["torch", "jax"]


def _make(backend: str, extra: list[str]) -> SAEBackend:
    config = load_config(None, BASE + extra)
    if backend == "torch":
        return TorchSAE(config, torch.device("cpu"))
    pytest.importorskip("jax")
    from sae_engine.training.jax_backend import JaxSAE

    return JaxSAE(config)


def _batch(g: torch.Generator, is_transcoder: bool, rows: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with an offset and a scale (so normalisation matters) and, for transcoders, a
    target that is a fixed linear map of the input plus noise."""
    x = 3.0 + 2.0 * torch.randn(rows, D_IN, generator=g)
    if not is_transcoder:
        return x, x
    mix = torch.linspace(-1, 1, D_IN * D_OUT).reshape(D_IN, D_OUT)
    return x, x @ mix + 0.1 * torch.randn(rows, D_OUT, generator=g)


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-row layer norm written here in plain torch (the model's eps, 1e-5)."""
    return (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()


def _fvu(prediction: torch.Tensor, target: torch.Tensor) -> float:
    return float((prediction - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_method_keeps_the_contract(backend, variant):
    sae = _make(backend, VARIANTS[variant])
    m = sae.config.model
    assert isinstance(sae, SAEBackend) and isinstance(sae, SAEAnalysis)
    assert isinstance(sae, ArrayBackend) == (backend == "jax")
    assert sae.precision == "fp32"
    g = torch.Generator().manual_seed(0)
    sae.initialize(*_batch(g, m.is_transcoder, 256))

    # train_step: the metrics, as 0-d scalars; some latents do not fire in the last step: dead.
    fired = 0.0
    for _ in range(3):
        metrics = sae.train_step(*_batch(g, m.is_transcoder), 1e-3)
        assert set(metrics) == set(METRICS)
        assert all(tuple(v.shape) == () and math.isfinite(float(v)) for v in metrics.values())
        fired += float(metrics["l0"]) * B
    assert sae.adam_count == 3 and not sae.aux_active

    # state_tensors: the names, shapes and dtypes every backend shares.
    state = {name: t.clone() for name, t in sae.state_tensors().items()}  # may be views of live state
    assert {name: (tuple(t.shape), t.dtype) for name, t in state.items()} == state_shapes(m)
    assert all(torch.isfinite(t).all() for t in state.values())

    # latent_stats: read from the firing counters, which count the main code's positive values.
    since, count = state["buffer.since_fired"][:N], state["buffer.fire_count"][:N]
    assert int(count.sum()) == round(fired)
    stats = sae.latent_stats(3 * B)
    assert set(stats) == set(LATENT_STATS)
    assert stats["dead_fraction"] == pytest.approx(float((since > m.dead_tokens).float().mean()))
    assert stats["dense_fraction"] == pytest.approx(float((count / (3 * B) > 0.1).float().mean()))
    assert 0 < stats["dead_fraction"] < 1 and sae.aux_active
    assert int(sae.state_tensors()["buffer.fire_count"].sum()) == 0  # the window was reset
    metrics = sae.train_step(*_batch(g, m.is_transcoder), 1e-3)
    assert float(metrics["aux_loss"]) > 0  # AuxK ran on the dead latents

    # encode / decode / reconstruct, and evaluate computed from them.
    x, y = _batch(g, m.is_transcoder)
    values, indices = sae.encode(x)
    width = code_width(m)
    assert values.shape == indices.shape == (B, width)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert ((indices >= -1) & (indices < N)).all() and (values >= 0).all()
    assert (values[indices < 0] == 0).all()
    if m.kind == "topk":
        assert (indices >= 0).all() and (values[:, :-1] >= values[:, 1:]).all()
    prediction = sae.decode(values, indices, x)
    assert prediction.shape == (B, m.target_dim) and prediction.dtype == torch.float32
    evaluation = sae.evaluate(x, y)
    assert set(evaluation) == set(EVAL_METRICS)
    assert evaluation["eval_l0"] == pytest.approx(float((values > 0).sum(1).float().mean()))
    if m.normalize == "layernorm":  # evaluate's FVU is that of the layer-normalised target
        x_std = (x.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        fvu = _fvu((prediction - x.mean(1, keepdim=True)) / x_std, _layer_norm(y))
    else:  # one scale for prediction and target: evaluate's FVU is the raw one
        fvu = _fvu(prediction, y)
    assert evaluation["eval_fvu"] == pytest.approx(fvu, rel=1e-4)
    if m.is_transcoder:
        with pytest.raises(ValueError, match="transcoder"):
            sae.reconstruct(x)
    else:
        assert torch.equal(sae.reconstruct(x), prediction)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_round_trip_continues_identically(backend):
    """state_tensors -> load_state_tensors into a fresh backend: equal state, and the next step
    gives bitwise the same metrics and state."""
    extra = VARIANTS["batchtopk-rowsparse-layernorm"]
    first, second = _make(backend, extra), _make(backend, extra)
    g = torch.Generator().manual_seed(1)
    first.initialize(*_batch(g, False, 256))
    for _ in range(3):
        first.train_step(*_batch(g, False), 1e-3)
    first.latent_stats(3 * B)
    second.load_state_tensors(first.state_tensors(), first.adam_count, first.aux_active)
    assert second.adam_count == first.adam_count == 3 and second.aux_active == first.aux_active
    for name, tensor in first.state_tensors().items():
        assert torch.equal(second.state_tensors()[name], tensor), name
    batch = _batch(g, False)
    a, b = first.train_step(*batch, 1e-3), second.train_step(*batch, 1e-3)
    assert {k: float(v) for k, v in a.items()} == {k: float(v) for k, v in b.items()}
    for name, tensor in first.state_tensors().items():
        assert torch.equal(second.state_tensors()[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_fifty_steps_agree_torch_and_jax(variant):
    """From one state on the same batches: losses within 1e-4 relative at every step (fp32
    sums in different orders), latent statistics equal at every window, every state tensor
    within 1e-4 relative / 1e-5 absolute after 50 steps (Adam divides by sqrt(v), so tiny
    gradient differences move a parameter by up to lr * 1e-3 relative)."""
    ours, theirs = _make("torch", VARIANTS[variant]), _make("jax", VARIANTS[variant])
    m = ours.config.model
    is_transcoder = m.is_transcoder
    # JumpReLU's code is discontinuous: a pre-activation within fp32 rounding of its threshold
    # may be active in one backend only, which moves the L0 (and its penalty) by 1 / B a vector.
    flips = {"loss": 2 * m.l0_coef / B, "l0": 2 / B} if m.kind == "jumprelu" else {}
    g = torch.Generator().manual_seed(2)
    ours.initialize(*_batch(g, is_transcoder, 256))
    theirs.load_state_tensors(ours.state_tensors(), ours.adam_count, ours.aux_active)
    for step in range(50):
        x, y = _batch(g, is_transcoder)
        lr = 1e-3 * min(1.0, (step + 1) / 5)
        a, b = ours.train_step(x, y, lr), theirs.train_step(x, y, lr)
        for key in METRICS:
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=max(1e-6, flips.get(key, 0))), (step, key)
        if step % 10 == 9:
            assert ours.latent_stats(10 * B) == theirs.latent_stats(10 * B)  # one computation, equal counts
    assert ours.aux_active  # AuxK was exercised
    ours_state, theirs_state = ours.state_tensors(), theirs.state_tensors()
    assert ours_state.keys() == theirs_state.keys()
    for name, tensor in ours_state.items():
        # A JumpReLU threshold's pseudo-gradient jumps by l0_coef / (B eps) when a pre-activation
        # crosses its band's edge, which fp32 rounding can decide differently in the two backends.
        loose = name.endswith(".threshold")
        assert torch.allclose(theirs_state[name].double(), tensor.double(), rtol=1e-2 if loose else 1e-4,
                              atol=1e-4 if loose else 1e-5), name
    x, y = _batch(g, is_transcoder)
    assert theirs.evaluate(x, y) == pytest.approx(ours.evaluate(x, y), rel=1e-4)
    (ours_values, ours_indices), (theirs_values, theirs_indices) = ours.encode(x), theirs.encode(x)
    assert torch.allclose(theirs_values, ours_values, rtol=1e-4, atol=1e-5)
    assert (theirs_indices == ours_indices).float().mean() > 0.99  # near-ties may swap places


def test_both_backends_start_from_the_same_weights():
    """One initialisation (``init.initial_weights``): a fresh JaxSAE's state is a fresh TorchSAE's."""
    for extra in VARIANTS.values():
        ours, theirs = _make("torch", extra).state_tensors(), _make("jax", extra).state_tensors()
        assert all(torch.equal(theirs[name], tensor) for name, tensor in ours.items())


def _protocol_members(protocol: type) -> set[str]:
    return {name for klass in protocol.__mro__ if issubclass(klass, Protocol) and klass is not Protocol
            for name in {*vars(klass), *vars(klass).get("__annotations__", {})} if not name.startswith("_")}


def _backend_uses(path: Path) -> set[str]:
    """Attributes read of ``backend`` / ``self.backend`` in a module."""
    def is_backend(node: ast.expr) -> bool:
        return (isinstance(node, ast.Name) and node.id == "backend") or (
            isinstance(node, ast.Attribute) and node.attr == "backend")

    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and is_backend(node.value)}


def test_the_contract_lists_what_the_trainer_and_the_placements_use():
    """``SAEBackend`` (and a JAX mesh's ``ArrayBackend``) is exactly what the trainer, the
    placements and the checkpoints read of a backend: nothing more, nothing less."""
    used = set().union(*(_backend_uses(path) for folder in ("training", "parallel", "checkpoints")
                         for path in (PACKAGE / folder).glob("*.py")))
    assert used == _protocol_members(SAEBackend) | _protocol_members(ArrayBackend)
    assert _protocol_members(SAEBackend) >= {"train_step", "latent_stats", "state_tensors", "aux_active"}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["model.kind='batchtopk'", "model.multi_topk=true"], "model.multi_topk = True: is defined for model.kind = 'topk'"),
        (["model.kind='batchtopk'", "model.batchtopk_row_cap=3"], "model.batchtopk_row_cap = 3: must be an integer >= model.k = 4"),
        (["model.k_aux=0"], "model.k_aux = 0: must be a positive integer"),
        (["model.kind='matryoshka_topk'", "model.multi_topk=true"], "model.multi_topk = True: is defined for model.kind = 'topk'"),
    ],
)
def test_model_combinations_no_backend_defines_are_rejected_once(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, BASE + extra)
