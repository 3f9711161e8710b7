"""``prefix_decode`` (Matryoshka partial reconstructions) against the dense reference.

Forward and both gradients on every impl (Triton interpreted on CPU tensors), JAX, opcheck and
torch.compile. Error bounds: fp32 within 1e-5 of the largest magnitude (sums of up to k terms,
fp32 accumulation in different orders); bf16 within 2e-2 (8-bit mantissa; the chunked path
rounds each group's sum to bf16 once before the fp32 running sum) and 3e-2 for gradients.
With one boundary the result equals ``sparse_decode`` bitwise, gradients too.
"""
from __future__ import annotations

import pytest
import torch

import sae_kernels
from sae_kernels.reference import EMPTY, prefix_decode_ref

IMPLS = ["chunked", "reference", "triton"]
CASES = [  # B, k, n, d, boundaries
    (13, 7, 50, 33, [1, 2, 10, 31, 50]),  # groups of size 1 at the start, odd sizes
    (1, 1, 20, 9, [5, 20]),  # B = 1, k = 1
    (9, 37, 90, 300, [45, 89, 90]),  # k and d past one block, a last group of size 1
    (6, 5, 64, 16, [64]),  # a single group
]


def _code(B: int, k: int, n: int, dtype: torch.dtype, seed: int, repeats: bool = False):
    g = torch.Generator().manual_seed(seed)
    if repeats:
        indices = torch.randint(0, n, (B, k), generator=g)
    else:
        indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    indices[torch.rand(B, k, generator=g) < 0.25] = EMPTY
    if B > 2:
        indices[1] = EMPTY  # a row with no active latent
    values = torch.randn(B, k, generator=g).to(dtype)
    return values, indices


def _decoder(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) / d**0.5).to(dtype)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _grads(values, indices, W, boundaries, weights, impl):
    v, w = values.clone().requires_grad_(True), W.clone().requires_grad_(True)
    if impl == "autograd":
        out = prefix_decode_ref(v, indices, w, boundaries)
    else:
        out = sae_kernels.prefix_decode(v, indices, w, boundaries, impl=impl)
    (out.float() * weights).sum().backward()
    return out, v.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,k,n,d,boundaries", CASES)
def test_forward_and_gradients_fp32(impl, B, k, n, d, boundaries):
    values, indices = _code(B, k, n, torch.float32, seed=B * k + n)
    W = _decoder(n, d, torch.float32, seed=d)
    weights = torch.randn(len(boundaries), B, d, generator=torch.Generator().manual_seed(1))
    out, dv, dW = _grads(values, indices, W, boundaries, weights, impl)
    ref, ref_dv, ref_dW = _grads(values, indices, W, boundaries, weights, "autograd")
    assert out.shape == (len(boundaries), B, d) and out.dtype == torch.float32
    assert _rel_err(out, ref) <= 1e-5
    assert _rel_err(dv, ref_dv) <= 1e-5
    assert _rel_err(dW, ref_dW) <= 1e-5
    assert (dv[indices < 0] == 0).all()
    if B > 2:
        assert (out[:, 1] == 0).all()
    # Prefix g holds exactly the latents below m_g; the last prefix is the whole code.
    for g, m in enumerate(boundaries):
        inside = values * (indices < m)
        assert _rel_err(out[g], sae_kernels.sparse_decode(inside, indices, W, impl="reference")) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_repeated_latents_in_a_row(impl):
    B, k, n, d, boundaries = 8, 12, 10, 24, [3, 4, 10]
    values, indices = _code(B, k, n, torch.float32, seed=3, repeats=True)
    W = _decoder(n, d, torch.float32, seed=4)
    weights = torch.randn(3, B, d, generator=torch.Generator().manual_seed(5))
    got = _grads(values, indices, W, boundaries, weights, impl)
    want = _grads(values, indices, W, boundaries, weights, "autograd")
    for a, b in zip(got, want):
        assert _rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_bf16_within_bound(impl):
    B, k, n, d, boundaries = 11, 9, 70, 40, [7, 8, 30, 70]
    values, indices = _code(B, k, n, torch.bfloat16, seed=6)
    W = _decoder(n, d, torch.bfloat16, seed=7)
    weights = torch.randn(len(boundaries), B, d, generator=torch.Generator().manual_seed(8))
    out, dv, dW = _grads(values, indices, W, boundaries, weights, impl)
    ref, ref_dv, ref_dW = _grads(values.float(), indices, W.float(), boundaries, weights, "autograd")
    assert out.dtype == dv.dtype == dW.dtype == torch.bfloat16
    assert _rel_err(out, ref) <= 2e-2
    assert _rel_err(dv, ref_dv) <= 3e-2
    assert _rel_err(dW, ref_dW) <= 3e-2


def test_mixed_dtypes_promote():
    values, indices = _code(5, 4, 30, torch.bfloat16, seed=9)
    W = _decoder(30, 8, torch.float32, seed=10)
    for impl in IMPLS:
        assert sae_kernels.prefix_decode(values, indices, W, [10, 30], impl=impl).dtype == torch.float32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_group_is_exactly_sparse_decode(impl, dtype):
    B, k, n, d = 7, 6, 40, 20
    values, indices = _code(B, k, n, dtype, seed=11)
    W = _decoder(n, d, dtype, seed=12)
    weights = torch.randn(B, d, generator=torch.Generator().manual_seed(13))
    v1, w1 = values.clone().requires_grad_(True), W.clone().requires_grad_(True)
    out = sae_kernels.prefix_decode(v1, indices, w1, [n], impl=impl)
    (out[0].float() * weights).sum().backward()
    v2, w2 = values.clone().requires_grad_(True), W.clone().requires_grad_(True)
    ref = sae_kernels.sparse_decode(v2, indices, w2, impl=impl)
    (ref.float() * weights).sum().backward()
    assert out.shape == (1, B, d)
    assert torch.equal(out[0], ref)
    assert torch.equal(v1.grad, v2.grad) and torch.equal(w1.grad, w2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_sparse_backward_equals_dense_autograd(impl):
    B, k, n, d, boundaries = 10, 5, 200, 16, [20, 21, 150, 200]
    values, indices = _code(B, k, n, torch.float32, seed=14)
    W = _decoder(n, d, torch.float32, seed=15)
    grad_out = torch.randn(len(boundaries), B, d, generator=torch.Generator().manual_seed(16))
    grads = sae_kernels.prefix_decode_backward(grad_out, values, indices, W, boundaries, impl=impl)
    _, ref_dv, ref_dW = _grads(values, indices, W, boundaries, grad_out, "autograd")
    touched = torch.unique(indices[indices >= 0])
    assert torch.equal(grads.W_dec.rows, touched)
    assert _rel_err(grads.dvalues, ref_dv) <= 1e-5
    assert _rel_err(grads.W_dec.to_dense(n), ref_dW) <= 1e-5
    again = sae_kernels.prefix_decode_backward(grad_out, values, indices, W, boundaries, impl=impl)
    assert torch.equal(again.W_dec.grad, grads.W_dec.grad) and torch.equal(again.dvalues, grads.dvalues)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    values, indices = _code(4, 3, 24, torch.float32, seed=17)
    W = _decoder(24, 8, torch.float32, seed=18)
    op = torch.ops.sae_kernels.prefix_decode
    for boundaries in ([5, 6, 24], [24]):
        torch.library.opcheck(op, (values.clone().requires_grad_(True), indices, W.clone().requires_grad_(True),
                                   boundaries, impl))


def test_torch_compile_fullgraph():
    B, k, n, d, boundaries = 8, 4, 64, 16, [8, 32, 64]
    values, indices = _code(B, k, n, torch.float32, seed=19)
    W = _decoder(n, d, torch.float32, seed=20).requires_grad_(True)
    x = torch.randn(B, d, generator=torch.Generator().manual_seed(21))

    def loss(values):
        return ((sae_kernels.prefix_decode(values, indices, W, boundaries) - x) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    v = values.clone().requires_grad_(True)
    got = compiled(v)
    got.backward()
    grads = v.grad.clone(), W.grad.clone()
    W.grad = None
    v2 = values.clone().requires_grad_(True)
    want = loss(v2)
    want.backward()
    assert torch.allclose(got, want) and torch.allclose(grads[0], v2.grad) and torch.allclose(grads[1], W.grad)


@pytest.mark.parametrize(
    "boundaries,match",
    [
        ([10, 5, 30], "strictly increasing"),
        ([0, 30], "strictly increasing"),
        ([10, 10, 30], "strictly increasing"),
        ([10, 20], "last boundary must be n=30"),
        ([], "at least one"),
        ([10.5, 30], "integers"),
    ],
)
def test_bad_boundaries_get_one_clear_error(boundaries, match):
    values, indices = _code(4, 3, 30, torch.float32, seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        sae_kernels.prefix_decode(values, indices, torch.randn(30, 8), boundaries)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_at_scale_matches_the_chunked_path(dtype):
    """The compiled Triton kernel on CUDA at a realistic size, against the chunked path."""
    B, k, n, d, boundaries = 4096, 32, 65536, 1280, [128, 1024, 8192, 65536]
    g = torch.Generator(device="cuda").manual_seed(0)
    indices = torch.randint(0, n, (B, k), device="cuda", generator=g)
    indices[:, -3:] = EMPTY
    values = torch.rand(B, k, device="cuda", generator=g).to(dtype)
    W = (torch.randn(n, d, device="cuda", generator=g) / d**0.5).to(dtype)
    weights = torch.randn(len(boundaries), B, d, device="cuda", generator=g)
    got = _grads(values, indices, W, boundaries, weights, "triton")
    want = _grads(values, indices, W, boundaries, weights, "chunked")
    for a, b in zip(got, want):
        assert _rel_err(a, b) <= (1e-5 if dtype == torch.float32 else 2e-2)


# ----------------------------------------------------------------------------- JAX


def test_jax_forward_and_gradients_match_the_reference():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from sae_kernels import jax as skj

    with jax.default_device(jax.devices("cpu")[0]):
        for B, k, n, d, boundaries in CASES:
            values, indices = _code(B, k, n, torch.float32, seed=B + k)
            W = _decoder(n, d, torch.float32, seed=n)
            weights = torch.randn(len(boundaries), B, d, generator=torch.Generator().manual_seed(2))
            ref, ref_dv, ref_dW = _grads(values, indices, W, boundaries, weights, "autograd")
            r = jnp.asarray(weights.numpy())
            idx = jnp.asarray(indices.numpy())

            def loss(v, w):
                return jnp.sum(skj.prefix_decode(v, idx, w, tuple(boundaries), chunk_rows=4) * r)

            out = skj.prefix_decode(jnp.asarray(values.numpy()), idx, jnp.asarray(W.numpy()), tuple(boundaries))
            dv, dW = jax.grad(loss, argnums=(0, 1))(jnp.asarray(values.numpy()), jnp.asarray(W.numpy()))
            for got, want in ((out, ref), (dv, ref_dv), (dW, ref_dW)):
                got = torch.tensor(np.asarray(got))
                assert _rel_err(got, want) <= 1e-5
            if len(boundaries) == 1:
                dec = skj.sparse_decode(jnp.asarray(values.numpy()), idx, jnp.asarray(W.numpy()))
                np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(dec))
        with pytest.raises(ValueError, match="boundaries"):
            skj.prefix_decode(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((10, 4)), (5, 9))
        with pytest.raises(ValueError, match="XLA path only"):
            skj.prefix_decode(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32), jnp.zeros((10, 4)), (10,),
                              impl="triton")
