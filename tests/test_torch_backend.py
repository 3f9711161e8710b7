"""The PyTorch backend's hand-written sparse backward against autograd on a dense reference;
its initial weights, whole or a latent shard's rows; Adam."""
from __future__ import annotations

import pytest
import torch

from sae_engine.config import RunConfig
from sae_engine.training import init
from sae_engine.training.init import geometric_median, initial_weights
from sae_engine.training.optim import Adam
from sae_engine.training.torch_backend import TorchSAE


def _config(**model) -> RunConfig:
    config = RunConfig()
    config.train.precision = "fp32"
    config.model.d_in, config.model.n_latents, config.model.k = 12, 80, 4
    config.model.dead_tokens = 5
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def _code(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Dense TopK code: the k largest pre-activations per row, ReLU'd, zeros elsewhere. [B, n]."""
    top = pre.topk(k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())


def _reference_loss(m, params: dict[str, torch.Tensor], dead: torch.Tensor, x, y) -> torch.Tensor:
    """The training loss written densely in plain torch, for autograd: normalisation, TopK /
    BatchTopK, Multi-TopK at 4k (weight 1/8), Matryoshka (the mean of every prefix's FVU), AuxK
    over the ``dead`` latents."""
    def normalize(t: torch.Tensor) -> torch.Tensor:
        if m.normalize == "layernorm":
            return (t - t.mean(1, keepdim=True)) / (t.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        # "dataset": one scale to unit mean squared norm over the sample (here the batch itself)
        return t * t.pow(2).sum(1).mean().rsqrt()

    xn, yn = normalize(x), normalize(y)
    x_c = xn if m.d_out is not None else xn - params["b_dec"]
    pre = x_c @ params["W_enc"].T + params["b_enc"]
    if m.kind in ("batchtopk", "matryoshka_batchtopk"):  # the B*k largest of each row's row_cap best
        candidates = _code(pre, m.row_cap)
        cutoff = candidates.flatten().topk(x.shape[0] * m.k).values.min()
        z = candidates * (candidates >= cutoff)
    else:
        z = _code(pre, m.k)

    def decode(code: torch.Tensor) -> torch.Tensor:
        out = code @ params["W_dec"] + params["b_dec"]
        return out + xn @ params["W_skip"].T if "W_skip" in params else out

    total_variance = (yn - yn.mean(0)).pow(2).sum()
    error = decode(z) - yn
    loss = error.pow(2).sum() / total_variance
    if m.kind.startswith("matryoshka"):
        prefixes = m.matryoshka_prefixes
        latent = torch.arange(m.n_latents)
        loss = sum((decode(z * (latent < size)) - yn).pow(2).sum() / total_variance for size in prefixes) / len(prefixes)
    if m.multi_topk:
        loss = loss + (decode(_code(pre, 4 * m.k)) - yn).pow(2).sum() / total_variance / 8
    aux_z = _code(pre.masked_fill(~dead, -torch.inf), m.aux_k)
    residual = error.detach()
    aux = (aux_z @ params["W_dec"] - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    return loss + m.aux_coef * aux


@pytest.mark.parametrize(
    "model",
    [
        {},
        {"multi_topk": True},
        {"d_out": 7, "skip_connection": True},
        {"normalize": "layernorm", "k_aux": 6},
        {"kind": "batchtopk", "k": 3},
        {"kind": "matryoshka_batchtopk", "k": 3, "matryoshka_prefixes": [10, 40, 80]},
        {"kind": "matryoshka_topk", "matryoshka_prefixes": [3, 57, 80], "d_out": 7, "skip_connection": True},
    ],
)
def test_sparse_backward_equals_autograd(model):
    config = _config(**model)
    sae = TorchSAE(config, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x = 2.0 + torch.randn(16, config.model.d_in, generator=g)
    y = torch.randn(16, config.model.target_dim, generator=g) if config.model.is_transcoder else x
    sae.initialize(x, y)
    for p in sae.params.values():  # move away from the symmetric init
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    n = config.model.n_latents
    dead = torch.arange(n) < 40  # half the latents are dead
    sae.buffers["since_fired"][:n][dead] = 100
    sae.aux_active = True
    metrics, grads, _ = sae.loss_and_grads(x, y)

    params = {name: p.clone().requires_grad_(True) for name, p in sae.params.items()}
    loss = _reference_loss(config.model, params, dead, x, y)
    loss.backward()
    assert torch.allclose(metrics["loss"], loss, rtol=1e-5)
    W_dec = sae.params["W_dec"]
    ref_dW_dec = params["W_dec"].grad
    ref_dW_dec = ref_dW_dec - (ref_dW_dec * W_dec).sum(1, keepdim=True) * W_dec  # unit-norm rows: tangent part
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
    _, _, (values, indices) = sae.loss_and_grads(x, x)  # the training code
    assert values.shape[1] == config.model.row_cap == 12
    assert (values > 0).sum() <= 30 and (indices >= 0).sum() == 30
    threshold = sae.state_tensors()["buffer.batchtopk_threshold"]
    assert threshold > 0
    values_inf, indices_inf = sae.encode(x)
    assert values_inf.shape[1] == 12
    assert ((values_inf == 0) | (values_inf >= threshold)).all()
    assert ((indices_inf >= 0) == (values_inf >= threshold)).all()


def _drawn_at_once(config: RunConfig) -> dict[str, torch.Tensor]:
    """The initial weights drawn whole: W_dec = randn(n, d_out) with unit rows, then a
    transcoder's W_enc = randn(n, d_in) / sqrt(d_in) from the same generator (an SAE's: W_dec)."""
    m = config.model
    generator = torch.Generator().manual_seed(config.train.seed)
    W_dec = torch.randn(m.n_latents, m.target_dim, generator=generator)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = torch.randn(m.n_latents, m.d_in, generator=generator) / m.d_in**0.5 if m.is_transcoder else W_dec.clone()
    return {"W_enc": W_enc, "W_dec": W_dec}


@pytest.mark.parametrize("block_elements", [16, 64, init.BLOCK_ELEMENTS],
                         ids=["tiny-blocks", "small-blocks", "default"])
@pytest.mark.parametrize("model", [{"n_latents": 100, "d_in": 3}, {"n_latents": 37, "d_in": 5, "d_out": 7},
                                   {"n_latents": 33, "d_in": 1}], ids=["sae", "transcoder", "one-wide"])
def test_a_latent_range_draws_exactly_its_rows_of_the_whole_draw(monkeypatch, block_elements, model):
    """Drawn in blocks (the last one merged when shorter than 16 numbers), rows [lo, hi) equal
    those of the matrix drawn at once, and a whole TorchSAE starts from exactly that matrix."""
    monkeypatch.setattr(init, "BLOCK_ELEMENTS", block_elements)
    config = _config(**model)
    n = config.model.n_latents
    want = _drawn_at_once(config)
    for lo, hi in [(0, n), (0, 1), (5, 21), (16, 32), (n - 3, n), (n // 2, n // 2)]:
        got = initial_weights(config.model, config.train.seed, lo, hi)
        for name in want:
            assert torch.equal(got[name], want[name][lo:hi]), (name, lo, hi)
    sae = TorchSAE(config, torch.device("cpu"))
    assert all(torch.equal(sae.params[name], want[name]) for name in want)
    assert sae.n_rows == n


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
