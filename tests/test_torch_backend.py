"""The PyTorch backend's hand-written sparse backward against autograd on a dense reference."""
from __future__ import annotations

import pytest
import torch

from sae_engine.config import RunConfig
from sae_engine.init import geometric_median
from sae_engine.optim import Adam
from sae_engine.torch_backend import TorchSAE
from sae_kernels.reference import sparse_decode_ref, topk_encode_ref


def _config(**model) -> RunConfig:
    config = RunConfig()
    config.train.precision = "fp32"
    config.model.d_in, config.model.n_latents, config.model.k = 12, 80, 4
    config.model.dead_tokens = 5
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def _reference_loss(sae: TorchSAE, params: dict[str, torch.Tensor], x, y) -> torch.Tensor:
    """The same loss, written densely with autograd-friendly reference ops."""
    m = sae.config.model
    xn, yn = sae._norm_in(x), sae._norm_out(y)
    x_c = xn if m.is_transcoder else xn - params["b_dec"]
    k_code = m.row_cap if m.kind == "batchtopk" else (4 * m.k if m.multi_topk else m.k)
    values, indices = topk_encode_ref(x_c, params["W_enc"], params["b_enc"], k_code)

    def decode(v, i):
        out = sparse_decode_ref(v, i, params["W_dec"]) + params["b_dec"]
        return out + xn @ params["W_skip"].T if "W_skip" in params else out

    total_variance = (yn - yn.mean(0)).pow(2).sum()
    error = decode(values[:, : m.k], indices[:, : m.k]) - yn
    loss = error.pow(2).sum() / total_variance
    if m.multi_topk:
        loss = loss + (decode(values, indices) - yn).pow(2).sum() / total_variance / 8
    dead = sae.buffers["since_fired"][: m.n_latents] > m.dead_tokens
    aux_v, aux_i = topk_encode_ref(x_c, params["W_enc"], params["b_enc"], m.aux_k, dead)
    residual = error.detach()
    aux = (sparse_decode_ref(aux_v, aux_i, params["W_dec"]) - residual).pow(2).sum()
    return loss + dead.any() * m.aux_coef * aux / (residual - residual.mean(0)).pow(2).sum()


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"multi_topk": True},
        {"d_out": 7, "skip_connection": True},
        {"normalize": "layernorm", "k_aux": 6},
    ],
)
def test_sparse_backward_equals_autograd(model):
    config = _config(**model)
    sae = TorchSAE(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, config.model.d_in, generator=g)
    y = torch.randn(16, config.model.target_dim, generator=g) if config.model.is_transcoder else x
    sae.initialize(x, y)
    for p in sae.params.values():  # move away from the symmetric init
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    sae.buffers["since_fired"][:40] = 100  # half the latents are dead
    sae.aux_active = True
    metrics, grads, _ = sae.loss_and_grads(x, y)

    params = {name: p.clone().requires_grad_(True) for name, p in sae.params.items()}
    loss = _reference_loss(sae, params, x, y)
    loss.backward()
    assert torch.allclose(metrics["loss"], loss, rtol=1e-5)
    n = config.model.n_latents
    W_dec = sae.params["W_dec"]
    ref_dW_dec = params["W_dec"].grad
    ref_dW_dec = ref_dW_dec - (ref_dW_dec * W_dec).sum(1, keepdim=True) * W_dec
    expected = {
        "W_enc": (grads["W_enc"].to_dense(n), params["W_enc"].grad),
        "b_enc": (torch.zeros(n).index_copy_(0, grads["W_enc"].rows, grads["W_enc"].bias_grad), params["b_enc"].grad),
        "W_dec": (grads["W_dec"].to_dense(n), ref_dW_dec),
        "b_dec": (grads["b_dec"], params["b_dec"].grad),
    }
    if "W_skip" in params:
        expected["W_skip"] = (grads["W_skip"], params["W_skip"].grad)
    for name, (got, want) in expected.items():
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name


def test_batchtopk_keeps_b_times_k_and_learns_a_threshold():
    config = _config(kind="batchtopk", k=3)
    sae = TorchSAE(config, torch.device("cpu"))
    x = torch.randn(10, config.model.d_in, generator=torch.Generator().manual_seed(2))
    sae.initialize(x, x)
    W_enc, b_enc, _ = sae._weights()
    values, indices = sae._encode(sae._encoder_input(sae._norm_in(x)), W_enc, b_enc, training=True)
    assert values.shape[1] == config.model.row_cap == 12
    assert (values > 0).sum() <= 30 and (indices >= 0).sum() == 30
    assert sae.buffers["batchtopk_threshold"] > 0
    values_inf, _ = sae.encode(x)
    assert ((values_inf == 0) | (values_inf >= sae.buffers["batchtopk_threshold"])).all()


def test_row_sparse_adam_moves_touched_rows_like_dense_adam_and_freezes_the_rest():
    g = torch.Generator().manual_seed(3)
    start = torch.randn(6, 4, generator=g)
    dense = Adam({"w": start.clone()})
    sparse = Adam({"w": start.clone()})
    rows = torch.tensor([1, 4])
    for _ in range(3):
        grad = torch.randn(2, 4, generator=g)
        dense.begin_step()
        sparse.begin_step()
        dense.step({"w": torch.zeros(6, 4).index_copy_(0, rows, grad)}, lr=0.1)
        sparse.step_rows("w", rows, grad, lr=0.1)
    assert torch.allclose(sparse.params["w"][rows], dense.params["w"][rows])
    untouched = torch.tensor([0, 2, 3, 5])
    assert torch.equal(sparse.params["w"][untouched], start[untouched])


def test_adam_matches_optax():
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    import numpy as np

    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, generator=g)
    ours = Adam({"w": w.clone()})
    opt = optax.adam(1e-2)
    params = jnp.asarray(w.numpy())
    state = opt.init(params)
    for _ in range(5):
        grad = torch.randn(5, 3, generator=g)
        ours.begin_step()
        ours.step({"w": grad}, 1e-2)
        updates, state = opt.update(jnp.asarray(grad.numpy()), state, params)
        params = params + updates
    assert np.allclose(ours.params["w"].numpy(), np.asarray(params), rtol=1e-5, atol=1e-7)


def test_geometric_median_resists_outliers():
    points = torch.zeros(101, 2)
    points[:, 0] = torch.linspace(-1, 1, 101)
    points[:10] = 1000.0
    median = geometric_median(points)
    assert median.abs().max() < 1.0 < points.mean(0).abs().max()
