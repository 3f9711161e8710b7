"""sae_kernels.jax against the plain-PyTorch reference (forward and gradients), on the CPU."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.extend import core as jex_core

from sae_kernels import jax as skj
from sae_kernels.reference import sparse_decode_ref, topk_encode_ref

# The XLA path on the CPU, explicitly: "auto" would pick Triton on a GPU machine.
encode = functools.partial(skj.topk_encode, impl="xla")
decode = functools.partial(skj.sparse_decode, impl="xla")

# fp32: products and sums in fp32 on both sides, in different orders.
F32_TOL = dict(rtol=1e-5, atol=1e-5)
# bf16 / fp16: results are rounded to 8 / 11 significant bits after fp32 accumulation, so they
# may differ by one ulp of the largest magnitude: relative 2**-7 / 2**-10.
LOWP_REL = {jnp.bfloat16: 2.0**-7, jnp.float16: 2.0**-10}
TORCH_DTYPE = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}

# (B, d, n, k): odd sizes, B=1, k=1, k near n, k=n.
SHAPES = [(1, 5, 3, 1), (37, 19, 53, 7), (16, 33, 100, 99), (5, 8, 16, 16), (13, 7, 129, 1)]


@pytest.fixture(autouse=True)
def _on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _inputs(B: int, d: int, n: int, seed: int, dtype=jnp.float32):
    """fp32 NumPy x[B, d], W[n, d], b[n], rounded to ``dtype`` so both sides see the same values."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, d))
    W = rng.standard_normal((n, d)) / np.sqrt(d)
    b = 0.1 * rng.standard_normal(n)
    return tuple(_round(a, dtype) for a in (x, W, b))


def _round(a: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))


def _to_jax(a: np.ndarray, dtype) -> jax.Array:
    return jnp.asarray(a).astype(dtype)


def _to_torch(a: np.ndarray, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.tensor(a).to(dtype).requires_grad_(grad)


def _np(a) -> np.ndarray:
    """fp32 NumPy copy of a JAX array, torch tensor or NumPy array."""
    if isinstance(a, torch.Tensor):
        return a.detach().float().numpy()
    return np.asarray(jnp.asarray(a, jnp.float32))


def _encode_grads_jax(x, W, b, k, r, mask=None, **kw):
    def loss(x, W, b):
        values, _ = encode(x, W, b, k, latent_mask=mask, **kw)
        return jnp.sum(values.astype(jnp.float32) * r)

    return jax.grad(loss, argnums=(0, 1, 2))(x, W, b)


def _encode_grads_torch(x, W, b, k, r, mask=None):
    values, _ = topk_encode_ref(x, W, b, k, mask)
    (values.float() * torch.tensor(r)).sum().backward()
    return x.grad, W.grad, b.grad


def _assert_lowp_close(actual, expected, dtype) -> None:
    actual, expected = _np(actual), _np(expected)
    scale = max(np.abs(expected).max(), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=LOWP_REL[dtype] * scale)


# ----------------------------------------------------------------------------- encode


def _assert_reference_order(indices, x, W, b, k, rel=1e-5):
    """Indices against float64 pre-activations: the returned latents' exact pre-activations are
    the reference's top k within rounding, and every rank separated from both neighbours by
    more than twice the rounding bound holds the reference's own latent (XLA and torch sum in
    different orders, so latents within rounding of each other may come in either order)."""
    pre = x.astype(np.float64) @ W.T.astype(np.float64) + b
    bound = rel * (np.abs(x) @ np.abs(W).T + np.abs(b)).max()
    order = np.argsort(-pre, axis=1, kind="stable")
    ref = np.take_along_axis(pre, order, axis=1)
    np.testing.assert_allclose(np.take_along_axis(pre, indices, axis=1), ref[:, :k], rtol=0, atol=bound)
    gaps = np.concatenate([np.abs(np.diff(ref, axis=1)), np.full((len(ref), 1), np.inf)], axis=1)
    before = np.concatenate([np.full((len(ref), 1), np.inf), gaps[:, :-1]], axis=1)
    decided = ((gaps > 2 * bound) & (before > 2 * bound))[:, :k]
    np.testing.assert_array_equal(indices[decided], order[:, :k][decided])
    assert decided.mean() > 0.9, "the inputs have too many near-ties to test the order"


@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_encode_fp32_matches_reference(B, d, n, k):
    x, W, b = _inputs(B, d, n, seed=B * n + k)
    values, indices = encode(jnp.asarray(x), jnp.asarray(W), jnp.asarray(b), k)
    ref_v, _ = topk_encode_ref(torch.tensor(x), torch.tensor(W), torch.tensor(b), k)
    assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
    assert values.shape == indices.shape == (B, k)
    _assert_reference_order(np.asarray(indices), x, W, b, k)
    np.testing.assert_allclose(np.asarray(values), ref_v.numpy(), **F32_TOL)


@pytest.mark.parametrize("eligible", [0, 3])
def test_encode_mask_leaves_empty_slots(eligible):
    B, d, n, k = 9, 6, 20, 7
    x, W, b = _inputs(B, d, n, seed=eligible)
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(1).choice(n, eligible, replace=False)] = True
    mask_j = jnp.asarray(mask)
    values, indices = encode(*map(jnp.asarray, (x, W, b)), k, latent_mask=mask_j, chunk_rows=4)
    ref_v, ref_i = topk_encode_ref(*map(torch.tensor, (x, W, b)), k, torch.tensor(mask))
    values, indices = np.asarray(values), np.asarray(indices)
    np.testing.assert_array_equal(indices, ref_i.numpy())
    np.testing.assert_allclose(values, ref_v.numpy(), **F32_TOL)
    assert (indices[:, eligible:] == skj.EMPTY).all() and (values[:, eligible:] == 0).all()
    assert mask[indices[:, :eligible]].all()


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_encode_ties_go_to_smaller_index(chunk_rows):
    # Small integers make every pre-activation exact, so ties are exact on both sides.
    rng = np.random.default_rng(7)
    B, d, n, k = 11, 4, 70, 9
    x = rng.integers(-1, 2, (B, d)).astype(np.float32)
    W = rng.integers(-1, 2, (n, d)).astype(np.float32)
    b = np.zeros(n, np.float32)
    values, indices = encode(*map(jnp.asarray, (x, W, b)), k, chunk_rows=chunk_rows)
    ref_v, ref_i = topk_encode_ref(*map(torch.tensor, (x, W, b)), k)
    np.testing.assert_array_equal(np.asarray(indices), ref_i.numpy())
    np.testing.assert_array_equal(np.asarray(values), ref_v.numpy())


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_encode_low_precision_within_bound(dtype):
    B, d, n, k = 21, 24, 90, 8
    x, W, b = _inputs(B, d, n, seed=3, dtype=dtype)
    values, indices = encode(*(_to_jax(a, dtype) for a in (x, W, b)), k)
    ref_v, _ = topk_encode_ref(*(_to_torch(a, TORCH_DTYPE[dtype]) for a in (x, W, b)), k)
    assert values.dtype == dtype
    _assert_lowp_close(values, ref_v, dtype)
    # Near-ties may swap under different summation orders, so check what was selected: the
    # exact pre-activations of the returned latents are the reference's top k.
    pre = x.astype(np.float64) @ W.T.astype(np.float64) + b
    picked = np.take_along_axis(pre, np.asarray(indices), axis=1)
    _assert_lowp_close(np.maximum(picked, 0), ref_v, dtype)


@pytest.mark.parametrize("B,d,n,k", SHAPES[1:4])
def test_encode_grads_fp32_match_torch_autograd(B, d, n, k):
    x, W, b = _inputs(B, d, n, seed=11 * k)
    r = np.random.default_rng(k).standard_normal((B, k)).astype(np.float32)
    mask = np.random.default_rng(2).random(n) < 0.8
    got = _encode_grads_jax(
        jnp.asarray(x), jnp.asarray(W), jnp.asarray(b), k, r, mask=jnp.asarray(mask), chunk_rows=4
    )
    want = _encode_grads_torch(
        *(_to_torch(a, torch.float32, grad=True) for a in (x, W, b)), k, r, torch.tensor(mask)
    )
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g), w.numpy(), **F32_TOL)
    # Masked latents get exactly zero gradient.
    assert (np.asarray(got[1])[~mask] == 0).all() and (np.asarray(got[2])[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_encode_grads_low_precision_within_bound(dtype):
    B, d, n, k = 19, 16, 40, 5
    x, W, b = _inputs(B, d, n, seed=5, dtype=dtype)
    r = np.random.default_rng(0).standard_normal((B, k)).astype(np.float32)
    got = _encode_grads_jax(*(_to_jax(a, dtype) for a in (x, W, b)), k, r)
    want = _encode_grads_torch(*(_to_torch(a, TORCH_DTYPE[dtype], True) for a in (x, W, b)), k, r)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        _assert_lowp_close(g, w, dtype)


def test_encode_mixed_dtypes_follow_primals():
    x, W, b = _inputs(6, 8, 12, seed=0)
    r = np.ones((6, 3), np.float32)
    dx, dW, db = _encode_grads_jax(_to_jax(x, jnp.bfloat16), jnp.asarray(W), jnp.asarray(b), 3, r)
    assert (dx.dtype, dW.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.float32)


# ----------------------------------------------------------------------------- decode


def _sparse_code(B: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((B, k)).astype(np.float32)
    indices = rng.integers(0, n, (B, k)).astype(np.int32)  # repeats within a row are allowed
    empty = rng.random((B, k)) < 0.25
    indices[empty] = skj.EMPTY
    values[empty] = rng.standard_normal(int(empty.sum()))  # ignored: the slot is empty
    return values, indices


@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_decode_fp32_matches_reference(B, d, n, k):
    values, indices = _sparse_code(B, n, k, seed=B + k)
    W = _inputs(1, d, n, seed=k)[1]
    out = decode(jnp.asarray(values), jnp.asarray(indices), jnp.asarray(W), chunk_rows=4)
    ref = sparse_decode_ref(torch.tensor(values), torch.tensor(indices).long(), torch.tensor(W))
    assert out.dtype == jnp.float32 and out.shape == (B, d)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), **F32_TOL)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_decode_grads_match_torch_autograd(dtype):
    B, d, n, k = 23, 13, 31, 6
    values, indices = _sparse_code(B, n, k, seed=4)
    W = _inputs(1, d, n, seed=9, dtype=dtype)[1]
    values = _round(values, dtype)
    r = np.random.default_rng(1).standard_normal((B, d)).astype(np.float32)

    def loss(v, w):
        out = decode(v, jnp.asarray(indices), w, chunk_rows=5)
        return jnp.sum(out.astype(jnp.float32) * r)

    got = jax.grad(loss, argnums=(0, 1))(_to_jax(values, dtype), _to_jax(W, dtype))
    tv, tw = (_to_torch(a, TORCH_DTYPE[dtype], grad=True) for a in (values, W))
    ref = sparse_decode_ref(tv, torch.tensor(indices).long(), tw)
    (ref.float() * torch.tensor(r)).sum().backward()
    for g, w in zip(got, (tv.grad, tw.grad)):
        assert g.dtype == dtype
        if dtype == jnp.float32:
            np.testing.assert_allclose(np.asarray(g), w.numpy(), **F32_TOL)
        else:
            _assert_lowp_close(g, w, dtype)
    assert (np.asarray(got[0].astype(jnp.float32))[indices < 0] == 0).all()


def test_decode_output_dtype_is_promoted():
    values, indices = _sparse_code(4, 10, 3, seed=0)
    values, indices = _to_jax(values, jnp.bfloat16), jnp.asarray(indices)
    W = jnp.ones((10, 5), jnp.float32)
    assert decode(values, indices, W).dtype == jnp.float32
    assert decode(values, indices, W.astype(jnp.bfloat16)).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- chunking and jit


def _sae_loss(x, W_enc, b_enc, W_dec, k, chunk_rows):
    values, indices = encode(x, W_enc, b_enc, k, chunk_rows=chunk_rows)
    return jnp.sum((decode(values, indices, W_dec, chunk_rows=chunk_rows) - x) ** 2)


def test_chunked_matches_unchunked_when_batch_is_not_a_multiple():
    B, d, n, k = 29, 10, 45, 6
    x, W, b = (jnp.asarray(a) for a in _inputs(B, d, n, seed=8))
    grad = jax.jit(jax.value_and_grad(_sae_loss, argnums=(0, 1, 2, 3)), static_argnums=(4, 5))
    whole = grad(x, W, b, W, k, None)
    for chunk_rows in (4, 28):  # 29 rows: 8 chunks, 3 padding rows; 2 chunks, 27 padding rows
        chunked = grad(x, W, b, W, k, chunk_rows)
        for a, c in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
            np.testing.assert_allclose(np.asarray(c), np.asarray(a), **F32_TOL)
        np.testing.assert_array_equal(
            np.asarray(encode(x, W, b, k, chunk_rows=chunk_rows)[1]),
            np.asarray(encode(x, W, b, k)[1]),
        )


def _avals(jaxpr: jex_core.Jaxpr):
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex_core.ClosedJaxpr):
                    yield from _avals(sub.jaxpr)
                elif isinstance(sub, jex_core.Jaxpr):
                    yield from _avals(sub)


def test_jit_step_never_materializes_batch_by_latents():
    B, d, n, k = 64, 8, 100, 4
    x, W, b = (jnp.asarray(a) for a in _inputs(B, d, n, seed=12))
    step = jax.jit(jax.value_and_grad(_sae_loss, argnums=(1, 2, 3)), static_argnums=(4, 5))
    loss, grads = step(x, W, b, W, k, 8)
    eager_loss, eager_grads = jax.value_and_grad(_sae_loss, argnums=(1, 2, 3))(x, W, b, W, k, 8)
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=1e-6)
    for g, e in zip(grads, eager_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), **F32_TOL)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(_sae_loss, argnums=(1, 2, 3)), static_argnums=(4, 5))(
        x, W, b, W, k, 8
    )
    biggest = max(int(np.prod(a.shape)) for a in _avals(jaxpr.jaxpr) if hasattr(a, "shape"))
    assert biggest < B * n // 4, f"an intermediate of {biggest} elements (B * n = {B * n})"


# ----------------------------------------------------------------------------- impl selection


def test_auto_on_cpu_is_xla():
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks by the default backend")
    x, W, b = (jnp.asarray(a) for a in _inputs(7, 6, 20, seed=1))
    for a, c in zip(skj.topk_encode(x, W, b, 5), encode(x, W, b, 5)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_bad_arguments_raise():
    x, W, b = (jnp.asarray(a) for a in _inputs(3, 4, 6, seed=0))
    with pytest.raises(ValueError, match="k must be"):
        encode(x, W, b, 7)
    with pytest.raises(ValueError, match="impl"):
        skj.topk_encode(x, W, b, 2, impl="cuda")
    with pytest.raises(ValueError, match="b_enc"):
        encode(x, W, b[:5], 2)
    with pytest.raises(ValueError, match="integers"):
        decode(x[:, :2], x[:, :2], W)


def test_triton_without_jax_triton_says_so():
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("jax_triton is installed")
    x, W, b = (jnp.asarray(a) for a in _inputs(3, 4, 6, seed=0))
    with pytest.raises(ImportError, match="jax-triton"):
        skj.topk_encode(x, W, b, 2, impl="triton")


def test_merge_candidates_decodes_the_kernels_packed_keys():
    # Packs keys as the Triton encoder does (value bits mapped to an order-preserving int32 in
    # the high word, ~latent in the low word), with exact ties and empty (-inf) slots.
    rng = np.random.default_rng(0)
    splits, B, k_pad, k = 3, 5, 8, 6
    vals = rng.integers(-3, 4, (splits, B, k_pad)).astype(np.float32)
    vals[:, :, -2:] = -np.inf
    lat = rng.permutation(200)[: splits * B * k_pad].reshape(splits, B, k_pad)  # disjoint splits
    bits = vals.view(np.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    keys = (ordered.astype(np.int64) << 32) | (lat.astype(np.int64) ^ 0xFFFFFFFF)
    keys = -np.sort(-keys, axis=2)  # each split's candidates come sorted descending
    halves = keys.view(np.int32).reshape(splits, B, k_pad, 2)  # little-endian: (low, high)
    top, idx = skj._merge_candidates(jnp.asarray(halves), k)

    flat_v = np.moveaxis(vals, 0, 1).reshape(B, -1)
    flat_l = np.moveaxis(lat, 0, 1).reshape(B, -1)
    order = np.lexsort((flat_l, -flat_v), axis=1)[:, :k]
    np.testing.assert_array_equal(np.asarray(top), np.take_along_axis(flat_v, order, 1))
    np.testing.assert_array_equal(np.asarray(idx), np.take_along_axis(flat_l, order, 1))
