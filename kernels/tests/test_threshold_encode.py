"""``threshold_encode`` (JumpReLU) against the dense reference: forward, band, gradients.

Every impl (Triton interpreted on CPU tensors), JAX, opcheck and torch.compile. Small-integer
inputs make every pre-activation exact in fp32 and bf16 and in any summation order, so those
tests demand equal lists, counts and overflow flags, with many latents exactly at their
threshold (inactive). Random normal inputs: fp32 values within 1e-5 of the largest magnitude;
for bf16 the chunked CPU GEMM may round pre-activations to bf16 (on CPUs with bf16 units), so
only latents farther than 2e-2 (relative) from their threshold must agree, and values are
within 2e-2. Gradients: fp32 within 1e-4 relative, bf16 within 3e-2.
"""
from __future__ import annotations

import pytest
import torch

import sae_kernels
from sae_kernels import chunked
from sae_kernels.reference import EMPTY, sparse_decode_ref, threshold_encode_ref

IMPLS = ["chunked", "reference", "triton"]
SHAPES = [  # B, d, n, cap: odd sizes, cap = 1, several latent tiles and splits, cap > n
    (13, 24, 300, 7),
    (1, 16, 50, 1),
    (9, 33, 517, 40),
    (5, 8, 20, 32),
]


def _int_inputs(B: int, d: int, n: int, dtype: torch.dtype, seed: int):
    """Integer inputs: x[0] is zero, and its pre-activations sit on or under every threshold."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (B, d), generator=g).float()
    x[0] = 0
    W = torch.randint(-2, 3, (n, d), generator=g).float()
    b = torch.randint(-3, 4, (n,), generator=g).float()
    threshold = b + torch.randint(0, 3, (n,), generator=g).float()  # row 0: nothing active
    return x.to(dtype), W.to(dtype), b.to(dtype), threshold


def _normal_inputs(B: int, d: int, n: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    W = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype)
    threshold = 0.5 + 0.5 * torch.rand(n, generator=g)
    return x, W, b, threshold


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _assert_same_code(code, ref, cap, band_cap):
    values, indices, counts, band_pre, band_idx, band_counts = ref
    assert torch.equal(code.indices, indices)
    assert torch.equal(code.values.float(), values.float())
    assert torch.equal(code.counts, counts)
    assert torch.equal(code.overflow, counts > cap)
    assert torch.equal(code.band_indices, band_idx)
    assert torch.equal(code.band_pre, band_pre)
    assert torch.equal(code.band_counts, band_counts)
    assert torch.equal(code.band_overflow, band_counts > band_cap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,d,n,cap", SHAPES)
def test_exact_on_integer_inputs_with_ties(impl, dtype, B, d, n, cap):
    x, W, b, threshold = _int_inputs(B, d, n, dtype, seed=B * n + cap)
    pre = x.double() @ W.double().T + b.double()
    assert (pre == threshold.double()).sum() > 0, "no latent sits exactly at its threshold"
    band_cap = max(1, cap // 2)
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=3.0, band_cap=band_cap, impl=impl)
    ref = threshold_encode_ref(x, W, b, threshold, cap, 3.0, band_cap)
    assert code.values.dtype == dtype and code.indices.dtype == code.counts.dtype == torch.int64
    assert code.band_pre.dtype == torch.float32 and code.overflow.dtype == torch.bool
    assert code.values.shape == (B, cap) and code.band_pre.shape == (B, band_cap)
    _assert_same_code(code, ref, cap, band_cap)
    # Counts against the definition, and what the lists hold.
    assert torch.equal(code.counts, (pre > threshold.double()).sum(1))
    assert torch.equal(code.band_counts, ((pre - threshold.double()).abs() < 1.5).sum(1))
    assert code.counts[0] == 0 and (code.indices[0] == EMPTY).all() and (code.values[0] == 0).all()
    live = code.indices >= 0
    assert torch.equal(live.sum(1), code.counts.clamp(max=cap))
    assert (code.values[~live] == 0).all()
    gap = torch.where(live, code.indices, n)
    assert ((gap[:, 1:] > gap[:, :-1]) | (gap[:, 1:] == n)).all()  # ascending index, empties last
    assert (pre.gather(1, code.indices.clamp_min(0))[live] > threshold[code.indices[live]].double()).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thresholds_below_the_bias(impl, dtype):
    # threshold - b_enc < 0 for some latents (the CPU bf16 path screens those apart), and zero
    # rows of x whose pre-activations are exactly b_enc.
    B, d, n, cap = 7, 16, 150, 90
    x, W, b, threshold = _int_inputs(B, d, n, dtype, seed=21)
    x[3] = 0
    threshold[::3] = b[::3].float() - 1.5
    threshold[1::7] = b[1::7].float() - 1.0  # zero rows sit 1 above these thresholds
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=2.5, impl=impl)
    ref = threshold_encode_ref(x, W, b, threshold, cap, 2.5, cap)
    _assert_same_code(code, ref, cap, cap)
    assert code.counts[0] > 0 and code.counts[3] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_over_the_cap_keep_the_lowest_indices(impl):
    B, d, n, cap = 6, 12, 260, 3
    x, W, b, threshold = _int_inputs(B, d, n, torch.float32, seed=1)
    threshold -= 4  # most latents active
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, impl=impl)
    pre = x @ W.T + b
    active = pre > threshold
    assert code.overflow.all()
    assert torch.equal(code.counts, active.sum(1))
    for row in range(B):
        first = active[row].nonzero().squeeze(1)[:cap]
        assert torch.equal(code.indices[row, : first.numel()], first)
    assert code.band_pre.shape == (B, 0) and (code.band_counts == 0).all() and not code.band_overflow.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_random_matches_reference(impl):
    B, d, n, cap = 17, 40, 333, 200
    x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=2)
    pre = x.double() @ W.double().T + b.double()
    assert (pre - threshold.double()).abs().min() > 1e-5  # no near-ties: one right answer
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=0.2, impl=impl)
    ref = threshold_encode_ref(x, W, b, threshold, cap, 0.2, cap)
    assert not code.overflow.any() and code.counts.min() > 0
    assert torch.equal(code.indices, ref[1]) and torch.equal(code.counts, ref[2])
    assert _rel_err(code.values, ref[0]) <= 1e-5
    near_band_edge = ((pre - threshold.double()).abs() - 0.1).abs().min()
    assert near_band_edge > 1e-5
    assert torch.equal(code.band_indices, ref[4]) and torch.equal(code.band_counts, ref[5])
    assert _rel_err(code.band_pre, ref[3]) <= 1e-5


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("fp32_gemm", [True, False])
def test_bf16_selection_within_bound(monkeypatch, impl, fp32_gemm):
    monkeypatch.setattr(chunked, "FP32_GEMM", fp32_gemm)
    B, d, n, cap = 15, 48, 400, 200
    x, W, b, threshold = _normal_inputs(B, d, n, torch.bfloat16, seed=3)
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, impl=impl)
    pre = x.float() @ W.float().T + b.float()
    tol = 2e-2 * pre.abs().max().item()
    assert not code.overflow.any()
    live = code.indices >= 0
    chosen = torch.zeros(B, n, dtype=torch.bool)
    chosen[torch.arange(B)[:, None].expand_as(live)[live], code.indices[live]] = True
    assert chosen[pre - threshold > tol].all()
    assert not chosen[pre - threshold < -tol].any()
    assert (code.values.float() - pre.gather(1, code.indices.clamp_min(0))).abs()[live].max() <= tol


def _grads(x, W, b, threshold, W_dec, cap, impl):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W, b, threshold, W_dec)]
    xx, ww, bb, tt, wd = leaves
    if impl == "autograd":
        values, indices, *_ = threshold_encode_ref(xx, ww, bb, tt, cap)
        out = sparse_decode_ref(values, indices, wd)
    else:
        code = sae_kernels.threshold_encode(xx, ww, bb, tt, cap, impl=impl)
        out = sae_kernels.sparse_decode(code.values, code.indices, wd, impl=impl)
    ((out.float() - xx.float()) ** 2).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cap", [4, 80])  # with overflow (the dropped latents get no gradient) and without
def test_gradients_fp32(impl, cap):
    B, d, n = 11, 24, 97
    x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=4)
    threshold -= 0.8  # some negative thresholds: active values below zero pass gradient too
    W_dec = (torch.randn(n, d, generator=torch.Generator().manual_seed(5)) / d**0.5)
    out, grads = _grads(x, W, b, threshold, W_dec, cap, impl)
    ref_out, ref_grads = _grads(x, W, b, threshold, W_dec, cap, "autograd")
    assert _rel_err(out, ref_out) <= 1e-5
    for name, got, want in zip(["x", "W_enc", "b_enc", "threshold", "W_dec"], grads, ref_grads):
        if name == "threshold":
            assert got is None  # left to the caller (the pseudo-gradient from the band)
            continue
        assert got.dtype == want.dtype
        assert _rel_err(got, want) <= 1e-4, name


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_gradients_bf16_within_bound(impl, monkeypatch):
    monkeypatch.setattr(chunked, "FP32_GEMM", True)  # the same selection as the fp32 reference
    B, d, n, cap = 9, 32, 120, 60
    x, W, b, threshold = _normal_inputs(B, d, n, torch.bfloat16, seed=6)
    W_dec = (torch.randn(n, d, generator=torch.Generator().manual_seed(7)) / d**0.5).to(torch.bfloat16)
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, impl=impl)
    ref = threshold_encode_ref(x.float(), W.float(), b.float(), threshold, cap)
    assert torch.equal(code.indices, ref[1])
    _, grads = _grads(x, W, b, threshold, W_dec, cap, impl)
    _, ref_grads = _grads(x.float(), W.float(), b.float(), threshold, W_dec.float(), cap, "autograd")
    for name, got, want in zip(["x", "W_enc", "b_enc"], grads[:3], ref_grads[:3]):
        assert got.dtype == torch.bfloat16
        assert _rel_err(got, want) <= 3e-2, name


@pytest.mark.parametrize("impl", IMPLS)
def test_row_sparse_backward_equals_dense_autograd(impl):
    B, d, n, cap = 10, 16, 200, 30
    x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=8)
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, impl=impl)
    grad_values = torch.randn(B, cap, generator=torch.Generator().manual_seed(9))
    grads = sae_kernels.threshold_encode_backward(grad_values, code.indices, x, W, impl=impl)
    leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
    values = threshold_encode_ref(*leaves, threshold, cap)[0]
    (values * grad_values).sum().backward()
    touched = torch.unique(code.indices[code.indices >= 0])
    assert torch.equal(grads.W_enc.rows, touched)
    assert _rel_err(grads.dx, leaves[0].grad) <= 1e-5
    assert _rel_err(grads.W_enc.to_dense(n), leaves[1].grad) <= 1e-5
    assert _rel_err(grads.W_enc.bias_to_dense(n), leaves[2].grad) <= 1e-5


def test_documented_threshold_pseudo_gradient_from_the_band():
    # The formula in threshold_encode's docstring, from the band lists, against the same formula
    # evaluated densely on the reference pre-activations.
    B, d, n, band, lam = 12, 16, 90, 0.3, 0.01
    x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=10)
    W_dec = torch.randn(n, d, generator=torch.Generator().manual_seed(11)) / d**0.5
    code = sae_kernels.threshold_encode(x, W, b, threshold, 64, band=band, band_cap=n, impl="chunked")
    recon = sae_kernels.sparse_decode(code.values, code.indices, W_dec)
    g_recon = 2 * (recon - x)
    g_band = torch.ops.sae_kernels.gather_dot(g_recon, code.band_indices, W_dec, "chunked")
    live = code.band_indices >= 0
    lat = code.band_indices[live]
    contrib = -(threshold[lat] * g_band[live] + lam) / band
    got = torch.zeros(n).index_add_(0, lat, contrib)
    pre = x @ W.T + b
    kernel = ((pre - threshold).abs() < band / 2).float()
    want = (-(threshold * (g_recon @ W_dec.T) + lam) / band * kernel).sum(0)
    assert _rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    x, W, b, threshold = _normal_inputs(4, 8, 40, torch.float32, seed=12)
    op = torch.ops.sae_kernels.threshold_encode
    grad = [t.clone().requires_grad_(True) for t in (x, W, b)]
    torch.library.opcheck(op, (*grad, threshold, 5, None, 0, impl))
    torch.library.opcheck(op, (*grad, threshold, 5, 0.4, 3, impl))


def test_torch_compile_fullgraph():
    B, d, n, cap = 8, 16, 64, 12
    x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=13)
    W.requires_grad_(True)
    W_dec = torch.randn(n, d, generator=torch.Generator().manual_seed(14)) / d**0.5

    def step(x):
        code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=0.2)
        recon = sae_kernels.sparse_decode(code.values, code.indices, W_dec)
        return ((recon - x) ** 2).sum(), code.counts, code.band_counts

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, counts, band_counts = compiled(x)
    loss.backward()
    grad = W.grad.clone()
    W.grad = None
    eager, eager_counts, eager_band = step(x)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(grad, W.grad)
    assert torch.equal(counts, eager_counts) and torch.equal(band_counts, eager_band)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("band", [None, 2.0])
def test_chunked_encoder_splits_rows_and_matches(monkeypatch, dtype, band):
    # Several chunks, flushes of the pending candidates between them, a row width that is not
    # a whole number of 8-byte words, and some thresholds below the bias.
    B, d, n, cap = 50, 8, 1001, 40
    x, W, b, threshold = _int_inputs(B, d, n, dtype, seed=15)
    threshold[::50] = b[::50].float() - 2
    monkeypatch.setattr(chunked, "FP32_GEMM", False)  # the bf16 GEMM and its integer screen
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 7 * n * x.element_size())
    monkeypatch.setattr(chunked, "MIN_CHUNK_ROWS", 1)
    assert chunked.rows_per_chunk(n, B, x.element_size()) == 7  # the [rows, n] buffer holds 7 of 50 rows
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=band, impl="chunked")
    ref = threshold_encode_ref(x, W, b, threshold, cap, band, cap if band else 0)
    _assert_same_code(code, ref, cap, cap if band else 0)
    assert code.overflow.any() and not code.overflow.all()


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(cap=0), "cap must be an integer >= 1"),
        (dict(threshold=torch.zeros(29)), "threshold has 29 entries but W_enc has n=30"),
        (dict(threshold=torch.zeros(30, dtype=torch.int64)), "threshold must be float32"),
        (dict(band=0.0), "band must be a finite number > 0"),
        (dict(band=0.5, band_cap=0), "band_cap must be an integer >= 1"),
        (dict(band_cap=4), "band_cap needs band"),
        (dict(x=torch.randn(4, 7)), "x has d=7 but W_enc has d=8"),
        (dict(impl="gpu"), "impl must be one of"),
    ],
)
def test_bad_input_gets_one_clear_error(args, match):
    call = dict(x=torch.randn(4, 8), W_enc=torch.randn(30, 8), b_enc=torch.zeros(30), threshold=torch.zeros(30),
                cap=3)
    call.update(args)
    kw = {key: call.pop(key) for key in ("band", "band_cap", "impl") if key in call}
    with pytest.raises((ValueError, TypeError), match=match):
        sae_kernels.threshold_encode(call["x"], call["W_enc"], call["b_enc"], call["threshold"], call["cap"], **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_at_scale_matches_the_chunked_path(dtype):
    """The compiled Triton kernel on CUDA at a realistic size, against the chunked path (both
    in fp32 accumulation; latents within 1e-3 of their threshold may go either way)."""
    B, d, n, cap = 2048, 1280, 65536, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(n, d, device="cuda", generator=g) / d**0.5).to(dtype)
    b = torch.zeros(n, device="cuda", dtype=dtype)
    threshold = torch.full((n,), 3.3, device="cuda")
    code = sae_kernels.threshold_encode(x, W, b, threshold, cap, band=0.1, impl="triton")
    pre = x.float() @ W.float().T
    decided = (pre - threshold).abs() > 1e-3 * pre.abs().amax()
    active = torch.zeros(B, n, dtype=torch.bool, device="cuda")
    live = code.indices >= 0
    active[torch.arange(B, device="cuda")[:, None].expand_as(live)[live], code.indices[live]] = True
    assert not code.overflow.any()
    assert torch.equal(active[decided], (pre > threshold)[decided])
    rows_decided = decided.all(dim=1)
    assert torch.equal(code.counts[rows_decided], (pre > threshold).sum(1)[rows_decided])
    # Row-major order of the listed latents is the lists' own (ascending index per row).
    torch.testing.assert_close(code.values.float()[live], pre[active], rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- JAX


def test_jax_matches_the_reference():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    from sae_kernels import jax as skj

    with jax.default_device(jax.devices("cpu")[0]):
        for B, d, n, cap in SHAPES:
            for dtype, jdtype in ((torch.float32, jnp.float32), (torch.bfloat16, jnp.bfloat16)):
                x, W, b, threshold = _int_inputs(B, d, n, dtype, seed=B + n)
                arrays = [jnp.asarray(t.float().numpy()).astype(jdtype) for t in (x, W, b)]
                code = skj.threshold_encode(*arrays, jnp.asarray(threshold.numpy()), cap, band=3.0, band_cap=5,
                                            chunk_rows=4)
                ref = threshold_encode_ref(x, W, b, threshold, cap, 3.0, 5)
                assert code.values.dtype == jdtype and code.indices.dtype == jnp.int32
                got = [code.values, code.indices, code.counts, code.band_pre, code.band_indices, code.band_counts]
                for a, r in zip(got, ref):
                    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), r.float().numpy())
                np.testing.assert_array_equal(np.asarray(code.overflow), (ref[2] > cap).numpy())
                np.testing.assert_array_equal(np.asarray(code.band_overflow), (ref[5] > 5).numpy())

        # Gradients through the values, against torch autograd on the reference.
        B, d, n, cap = 11, 24, 97, 6
        x, W, b, threshold = _normal_inputs(B, d, n, torch.float32, seed=16)
        r = torch.randn(B, cap, generator=torch.Generator().manual_seed(17))

        def loss(x, W, b, t):
            return jnp.sum(skj.threshold_encode(x, W, b, t, cap, chunk_rows=4).values * jnp.asarray(r.numpy()))

        got = jax.grad(loss, argnums=(0, 1, 2, 3))(*(jnp.asarray(t.numpy()) for t in (x, W, b, threshold)))
        leaves = [t.clone().requires_grad_(True) for t in (x, W, b)]
        (threshold_encode_ref(*leaves, threshold, cap)[0] * r).sum().backward()
        for g, t in zip(got[:3], leaves):
            assert _rel_err(torch.tensor(np.asarray(g)), t.grad) <= 1e-5
        assert not np.asarray(got[3]).any()  # the threshold's gradient is the caller's
        with pytest.raises(ValueError, match="cap"):
            skj.threshold_encode(*(jnp.asarray(t.numpy()) for t in (x, W, b, threshold)), 0)
        with pytest.raises(ValueError, match="XLA path only"):
            skj.threshold_encode(*(jnp.asarray(t.numpy()) for t in (x, W, b, threshold)), 3, impl="triton")
