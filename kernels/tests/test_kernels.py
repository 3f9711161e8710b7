"""The public kernel API against the plain reference: forward, every gradient, every impl.

Error bounds: fp32 values and gradients within 1e-5 relative to the largest magnitude (1e-4 for
gradients, which sum many terms); bf16 within 2e-2 relative (8-bit mantissa, fp32 accumulation).
For bf16 the selected set may differ from the fp32 reference where pre-activations are within
rounding of each other, so bf16 checks that the selection is a valid top-k of the reference
pre-activations instead of comparing indices.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sae_kernels
from sae_kernels import chunked
from sae_kernels.reference import EMPTY, sparse_decode_ref, topk_encode_ref

IMPLS = ["chunked", "reference", "triton"]
SHAPES = [  # B, d, n, k: odd sizes, k = 1, k near n, B = 1
    (37, 24, 300, 5),
    (1, 40, 130, 1),
    (9, 16, 70, 64),
    (13, 33, 517, 32),
]


def _inputs(B, d, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g).to(dtype)
    W_enc = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    b_enc = (0.1 * torch.randn(n, generator=g)).to(dtype)
    W_dec = (torch.randn(n, d, generator=g) / d**0.5).to(dtype)
    return x, W_enc, b_enc, W_dec


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _assert_matches_reference_order(indices, x, W_enc, b_enc, k, tol=1e-5):
    """Indices of an fp32-accumulated selection against float64 pre-activations.

    Summation order differs between implementations (and between BLAS builds), so two latents
    whose pre-activations are within rounding of each other may come in either order. Every
    slot must hold a latent whose exact pre-activation is within ``tol`` (relative to the sum of
    absolute products) of the reference's value there, and a slot separated from both
    neighbours by more than twice that must hold the reference's own latent.
    """
    pre = x.double() @ W_enc.double().T + b_enc.double()
    bound = tol * (x.double().abs() @ W_enc.double().abs().T + b_enc.double().abs()).max().item()
    top = torch.sort(pre, dim=1, descending=True, stable=True)
    ref_pre, ref_idx = top.values[:, : k + 1], top.indices[:, :k]
    assert (pre.gather(1, indices) - ref_pre[:, :k]).abs().max().item() <= bound
    gaps = (ref_pre[:, :-1] - ref_pre[:, 1:]).abs()  # [B, k]: gap to the next rank
    if ref_pre.shape[1] == k:  # k == n: the last slot has no next rank
        gaps = torch.cat([gaps, torch.full_like(gaps[:, :1], float("inf"))], dim=1)
    before = torch.cat([torch.full_like(gaps[:, :1], float("inf")), gaps[:, :-1]], dim=1)
    decided = (gaps > 2 * bound) & (before > 2 * bound)
    assert torch.equal(indices[decided], ref_idx[decided])
    assert decided.float().mean() > 0.9, "the inputs have too many near-ties to test the order"


def _assert_valid_topk(values, indices, x, W_enc, b_enc, k, tol):
    """values/indices form a top-k of the fp32 reference pre-activations, up to tol."""
    pre = x.float() @ W_enc.float().T + b_enc.float()
    ref_sorted = pre.topk(k).values.clamp_min(0)
    scale = pre.abs().max().item()
    assert (values.float() - ref_sorted).abs().max().item() <= tol * scale
    chosen = pre.gather(1, indices).clamp_min(0)
    assert (chosen - values.float()).abs().max().item() <= tol * scale
    assert all(len(set(row.tolist())) == k for row in indices), "an index was selected twice"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,d,n,k", SHAPES)
def test_encode_fp32_matches_reference(impl, B, d, n, k):
    x, W_enc, b_enc, _ = _inputs(B, d, n, torch.float32)
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl=impl)
    ref_values, _ = topk_encode_ref(x, W_enc, b_enc, k)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    assert values.shape == indices.shape == (B, k)
    assert _rel_err(values, ref_values) <= 1e-5
    _assert_matches_reference_order(indices, x, W_enc, b_enc, k)


@pytest.mark.parametrize("impl", IMPLS)
def test_encode_bf16_is_a_valid_topk(impl):
    B, d, n, k = 21, 48, 400, 16
    x, W_enc, b_enc, _ = _inputs(B, d, n, torch.bfloat16, seed=1)
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl=impl)
    assert values.dtype == torch.bfloat16
    _assert_valid_topk(values, indices, x, W_enc, b_enc, k, tol=2e-2)


def _tied_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[6, 8] and W_enc[300, 8]: 10 distinct latents repeated 30 times, so every top value is
    tied 30 ways. Small integers make each pre-activation exact in any summation order (a BLAS
    may sum the copies of one latent in different orders depending on their position)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (6, 8), generator=g).float()
    W_enc = torch.randint(-3, 4, (10, 8), generator=g).float().repeat(30, 1)
    return x, W_enc


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ties_go_to_the_smaller_index(impl):
    x, W_enc = _tied_inputs(seed=2)
    b_enc = torch.zeros(300)
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, 7, impl=impl)
    ref_values, ref_indices = topk_encode_ref(x, W_enc, b_enc, 7)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(values, ref_values)
    assert (indices < 70).all()  # 7 copies of a best latent, all from the first 7 blocks


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_with_fewer_eligible_than_k_pads_with_empty_slots(impl):
    x, W_enc, b_enc, W_dec = _inputs(5, 16, 90, torch.float32, seed=3)
    mask = torch.zeros(90, dtype=torch.bool)
    mask[[4, 41, 88]] = True
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, 6, latent_mask=mask, impl=impl)
    ref_values, ref_indices = topk_encode_ref(x, W_enc, b_enc, 6, mask)
    assert torch.equal(indices, ref_indices)
    assert (indices[:, 3:] == EMPTY).all() and (values[:, 3:] == 0).all()
    assert set(indices[:, :3].flatten().tolist()) <= {4, 41, 88}
    # Empty slots decode to nothing.
    out = sae_kernels.sparse_decode(values, indices, W_dec, impl=impl)
    assert _rel_err(out, sparse_decode_ref(values, indices, W_dec)) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_matches_reference(impl, dtype, tol):
    B, d, n, k = 19, 40, 150, 7
    _, _, _, W_dec = _inputs(B, d, n, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    values = torch.rand(B, k, generator=g).to(dtype)
    indices = torch.randint(-1, n, (B, k), generator=g)
    out = sae_kernels.sparse_decode(values, indices, W_dec, impl=impl)
    assert out.dtype == dtype and out.shape == (B, d)
    assert _rel_err(out, sparse_decode_ref(values, indices, W_dec)) <= tol


def _grads(fn, x, W_enc, b_enc, W_dec, k, mask, impl):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, W_enc, b_enc, W_dec)]
    xx, we, be, wd = leaves
    if impl == "autograd":  # plain torch autograd through the dense reference functions
        values, indices = topk_encode_ref(xx, we, be, k, mask)
        out = sparse_decode_ref(values, indices, wd)
    else:
        values, indices = sae_kernels.topk_encode(xx, we, be, k, latent_mask=mask, impl=impl)
        out = sae_kernels.sparse_decode(values, indices, wd, impl=impl)
    fn(out, xx).backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_gradients_match_reference_fp32(impl, use_mask):
    B, d, n, k = 11, 24, 97, 6
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.float32, seed=6)
    mask = (torch.arange(n) % 3 == 0) if use_mask else None
    loss = lambda out, xx: ((out - xx) ** 2).sum()  # noqa: E731
    out, grads = _grads(loss, x, W_enc, b_enc, W_dec, k, mask, impl)
    ref_out, ref_grads = _grads(loss, x, W_enc, b_enc, W_dec, k, mask, "autograd")
    assert _rel_err(out, ref_out) <= 1e-5
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec"], grads, ref_grads):
        assert got is not None, f"no gradient for {name}"
        assert got.dtype == want.dtype
        assert _rel_err(got, want) <= 1e-4, name


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_gradients_bf16_within_bound(impl):
    B, d, n, k = 9, 32, 120, 4
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.bfloat16, seed=7)
    # The reference runs in fp32 on the same (bf16-representable) inputs, and the bf16 run must
    # select the same latents for a like-for-like comparison: check that first.
    loss = lambda out, xx: (out.float() * xx.float()).sum()  # noqa: E731
    _, ref_indices = topk_encode_ref(x.float(), W_enc.float(), b_enc.float(), k)
    _, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl=impl)
    same_rows = (indices == ref_indices).all(dim=1)
    assert same_rows.float().mean() > 0.7
    x, ref_x = x[same_rows], x.float()[same_rows]
    _, grads = _grads(loss, x, W_enc, b_enc, W_dec, k, None, impl)
    _, ref_grads = _grads(loss, ref_x, W_enc.float(), b_enc.float(), W_dec.float(), k, None, "autograd")
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec"], grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert _rel_err(got, want) <= 3e-2, name


@pytest.mark.parametrize("impl", IMPLS)
def test_row_sparse_backward_equals_dense_autograd(impl):
    B, d, n, k = 10, 16, 200, 5
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.float32, seed=8)
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl=impl)
    g = torch.Generator().manual_seed(9)
    grad_out = torch.randn(B, d, generator=g)
    dec = sae_kernels.sparse_decode_backward(grad_out, values, indices, W_dec, impl=impl)
    enc = sae_kernels.topk_encode_backward(dec.dvalues, values, indices, x, W_enc, impl=impl)
    touched = torch.unique(indices)
    assert torch.equal(dec.W_dec.rows, touched) and torch.equal(enc.W_enc.rows, touched)
    _, ref = _grads(lambda out, xx: (out * grad_out).sum(), x, W_enc, b_enc, W_dec, k, None, "autograd")
    assert _rel_err(enc.dx, ref[0]) <= 1e-5
    assert _rel_err(enc.W_enc.to_dense(n), ref[1]) <= 1e-5
    assert _rel_err(enc.W_enc.bias_grad, ref[2][touched]) <= 1e-5
    assert _rel_err(dec.W_dec.to_dense(n), ref[3]) <= 1e-5
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[touched] = False
    assert (ref[3][untouched] == 0).all()


def test_backward_is_deterministic():
    B, d, n, k = 64, 32, 50, 8  # few latents: each is hit many times
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.float32, seed=10)
    runs = [_grads(lambda o, xx: (o * o).sum(), x, W_enc, b_enc, W_dec, k, None, "chunked")[1] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_chunked_encoder_splits_rows_and_matches(monkeypatch):
    B, d, n, k = 50, 8, 1000, 3
    x, W_enc, b_enc, _ = _inputs(B, d, n, torch.float32, seed=11)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 7 * n * 4)
    monkeypatch.setattr(chunked, "MIN_CHUNK_ROWS", 1)
    assert chunked.rows_per_chunk(n, B, 4) == 7  # 50 rows -> 8 chunks, the last short
    values, indices = chunked.topk_encode(x, W_enc, b_enc, k)
    _assert_matches_reference_order(indices, x, W_enc, b_enc, k)
    assert _rel_err(values, topk_encode_ref(x, W_enc, b_enc, k)[0]) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_grouped_selection_is_exact(k, dtype):
    g = torch.Generator().manual_seed(12)
    n = chunked.GROUP_SIZES[0] * chunked.MIN_GROUPS_PER_K * k * 3  # two nested group levels
    assert chunked.group_size(n, k) == chunked.GROUP_SIZES[0]
    pre = torch.randn(17, n, generator=g).to(dtype)
    pre[::2, -1] = 100.0  # the best latent sits in the last group
    pre[1, :] = -pre[1, :].abs()  # no non-negative entry: selected again in float order
    pre[3, : n - k + 1] = float("-inf")  # fewer than k finite entries
    top, idx = chunked.select_topk(pre, k)
    ref = pre.float().topk(k, dim=1)
    assert torch.equal(top.float(), ref.values)
    assert torch.equal(pre.float().gather(1, idx), ref.values)  # ties may pick other columns
    assert all(len(set(row.tolist())) == k for row in idx)


@pytest.mark.parametrize("extra", [0, 5])
def test_encoder_pads_rows_to_whole_groups(extra):
    k = 2
    n = chunked.GROUP_SIZES[0] * chunked.MIN_GROUPS_PER_K * k + extra
    assert chunked.padded_width(n, k) % chunked.GROUP_SIZES[0] == 0
    x, W_enc, b_enc, _ = _inputs(9, 8, n, torch.float32, seed=14)
    b_enc[-1] = 50.0  # the last real latent wins every row
    mask = torch.ones(n, dtype=torch.bool)
    mask[: n - 1] = False  # only one eligible latent: the second slot stays empty
    values, indices = chunked.topk_encode(x, W_enc, b_enc, k, latent_mask=mask)
    assert (indices[:, 0] == n - 1).all() and (indices[:, 1] == EMPTY).all()
    assert (values[:, 1] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fp32_gemm", [True, False])
def test_chunked_low_precision_gemm_keeps_the_selection_contract(monkeypatch, fp32_gemm, dtype):
    # Both CPU paths for bf16 / fp16 inputs: the GEMM in fp32 (CPUs without bf16 units) and in
    # the input dtype (CPUs with them). Outputs keep the input dtype either way.
    monkeypatch.setattr(chunked, "FP32_GEMM", fp32_gemm)
    B, d, n, k = 23, 40, 700, 12  # n wide enough for grouped selection
    x, W_enc, b_enc, _ = _inputs(B, d, n, dtype, seed=21)
    assert chunked.gemm_dtype(dtype, x.device) == (torch.float32 if fp32_gemm else dtype)
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl="chunked")
    assert values.dtype == dtype and indices.dtype == torch.int64
    ref_values = topk_encode_ref(x.float(), W_enc.float(), b_enc.float(), k)[0]
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half a unit in the last place
    if fp32_gemm:
        # Products of bf16/fp16 numbers are exact in fp32: the fp32 contract on the same inputs,
        # then one rounding of each value to the input dtype.
        _assert_matches_reference_order(indices, x.float(), W_enc.float(), b_enc.float(), k)
        assert ((values.float() - ref_values).abs() <= ulp * ref_values.abs() + 1e-6).all()
    else:
        _assert_valid_topk(values, indices, x, W_enc, b_enc, k, tol=2e-2)


def test_cpu_gemm_dtype_follows_the_hardware(monkeypatch):
    from sae_kernels import hardware

    cpu = torch.device("cpu")
    for flags, bf16_gemm in [({"avx2"}, torch.float32), ({"avx2", "avx512f"}, torch.float32),
                             ({"avx512f", "avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16)]:
        monkeypatch.setattr(hardware, "cpu_info", lambda f=frozenset(flags): hardware.CpuInfo("a CPU", f))
        assert chunked.gemm_dtype(torch.bfloat16, cpu) == bf16_gemm, flags
        assert chunked.gemm_dtype(torch.float16, cpu) == torch.float32
        assert chunked.gemm_dtype(torch.float32, cpu) == torch.float32
    monkeypatch.setattr(chunked, "FP32_GEMM", False)
    assert chunked.gemm_dtype(torch.bfloat16, cpu) == torch.bfloat16


def test_encoder_results_do_not_alias_its_reused_buffer():
    x, W_enc, b_enc, _ = _inputs(16, 8, 600, torch.float32, seed=16)
    first = chunked.topk_encode(x, W_enc, b_enc, 4)
    kept = [t.clone() for t in first]
    chunked.topk_encode(-x, W_enc, b_enc, 4)  # same shapes: the same buffer, other contents
    assert all(torch.equal(a, b) for a, b in zip(first, kept))


def test_encoder_indices_stay_in_range_on_nan_inputs():
    k = 2
    n = chunked.GROUP_SIZES[0] * chunked.MIN_GROUPS_PER_K * k + 5  # padded to whole groups
    x, W_enc, b_enc, _ = _inputs(4, 8, n, torch.float32, seed=15)
    x[1] = float("nan")
    _, indices = chunked.topk_encode(x, W_enc, b_enc, k)
    assert ((indices >= 0) & (indices < n) | (indices == EMPTY)).all()


def test_chunked_ties_keep_exact_values_and_distinct_latents():
    x, W_enc = _tied_inputs(seed=2)
    values, indices = sae_kernels.topk_encode(x, W_enc, torch.zeros(300), 7, impl="chunked")
    ref_values, _ = topk_encode_ref(x, W_enc, torch.zeros(300), 7)
    assert torch.equal(values, ref_values)
    pre = x @ W_enc.T
    assert torch.equal(pre.gather(1, indices).clamp_min(0), values)
    assert all(len(set(row.tolist())) == 7 for row in indices)


def test_a_plain_process_keeps_its_environment_and_never_imports_dynamo():
    # Every call goes through the custom ops; their first call must not import torch._dynamo.
    script = (
        "import os, sys, torch\n"
        "before = dict(os.environ)\n"
        "import sae_kernels, sae_kernels.triton_kernels as tk\n"
        "assert dict(os.environ) == before, 'importing sae_kernels changed the environment'\n"
        "from triton.runtime.jit import JITFunction\n"
        "assert isinstance(tk._encode_topk_kernel.compiled, JITFunction)\n"
        "x, W = torch.randn(4, 8), torch.randn(64, 8)\n"
        "values, indices = sae_kernels.topk_encode(x, W, torch.zeros(64), 3)\n"
        "sae_kernels.sparse_decode(values, indices, W)\n"
        "t_values, t_indices = sae_kernels.topk_encode(x, W, torch.zeros(64), 3, impl='triton')\n"
        "assert torch.equal(t_indices, indices), 'interpreted Triton kernel disagrees'\n"
        "W.requires_grad_(True)\n"
        "sae_kernels.topk_encode(x, W, torch.zeros(64), 3)[0].sum().backward()\n"
        "assert W.grad is not None\n"
        "assert 'torch._dynamo' not in sys.modules, 'dynamo imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_torch_compile_traces_through_the_custom_ops():
    B, d, n, k = 8, 16, 64, 4
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.float32, seed=13)
    W_enc.requires_grad_(True)

    def step(x):
        values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k)
        return ((sae_kernels.sparse_decode(values, indices, W_dec) - x) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grad_compiled = W_enc.grad.clone()
    W_enc.grad = None
    eager = step(x)
    eager.backward()
    assert torch.allclose(loss, eager) and torch.allclose(grad_compiled, W_enc.grad)


@pytest.mark.parametrize("impl", ["chunked", "reference", "triton"])
def test_every_custom_op_passes_opcheck(impl):
    # Forward ops with inputs that require grad (their autograd formulas and the backward ops
    # they call are checked too), and the backward ops on their own.
    B, d, n, k = 4, 8, 32, 3
    x, W_enc, b_enc, W_dec = _inputs(B, d, n, torch.float32, seed=14)
    ops = torch.ops.sae_kernels
    grad = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, W_dec)]
    torch.library.opcheck(ops.topk_encode, (*grad[:3], k, None, impl))
    torch.library.opcheck(ops.topk_encode, (x, W_enc, b_enc, k, torch.arange(n) % 2 == 0, impl))
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl=impl)
    indices[0, -1] = EMPTY
    torch.library.opcheck(ops.sparse_decode, (values.clone().requires_grad_(True), indices, grad[3], impl))
    g = torch.randn(B, d)
    torch.library.opcheck(ops.gather_dot, (g, indices, W_dec, impl))
    torch.library.opcheck(ops.segment_rows, (values, indices, g, impl))


def test_triton_with_a_k_beyond_its_registers_is_an_error_not_a_fallback():
    x, W_enc, b_enc, _ = _inputs(2, 8, 300, torch.float32)
    with pytest.raises(ValueError, match="impl='triton' keeps at most k=256"):
        sae_kernels.topk_encode(x, W_enc, b_enc, 257, impl="triton")
    values, _ = sae_kernels.topk_encode(x, W_enc, b_enc, 257)  # auto picks the chunked path
    assert values.shape == (2, 257)


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(k=0), "1 <= k <= n=30"),
        (dict(k=31), "1 <= k <= n=30"),
        (dict(x=torch.randn(4, 7)), "x has d=7 but W_enc has d=8"),
        (dict(b_enc=torch.zeros(29)), "b_enc has 29 entries but W_enc has n=30"),
        (dict(latent_mask=torch.ones(30)), "latent_mask must be a bool tensor"),
        (dict(latent_mask=torch.ones(5, dtype=torch.bool)), r"latent_mask must have shape \[n\]"),
        (dict(x=torch.randn(4, 8, dtype=torch.float64)), "x must be float32, bfloat16 or float16"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_encode_input_gets_one_clear_error(args, match):
    call = dict(x=torch.randn(4, 8), W_enc=torch.randn(30, 8), b_enc=torch.zeros(30), k=3)
    call.update(args)
    kw = {key: call.pop(key) for key in ("latent_mask", "impl") if key in call}
    with pytest.raises((ValueError, TypeError), match=match):
        sae_kernels.topk_encode(call["x"], call["W_enc"], call["b_enc"], call["k"], **kw)


def test_bad_decode_input_gets_one_clear_error():
    with pytest.raises(ValueError, match=r"indices \(4, 2\) and values \(4, 3\)"):
        sae_kernels.sparse_decode(torch.rand(4, 3), torch.zeros(4, 2, dtype=torch.long), torch.randn(10, 8))
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        sae_kernels.sparse_decode(torch.rand(4, 3), torch.zeros(4, 3), torch.randn(10, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_compiled_kernels_at_scale_match_the_chunked_path(dtype, tol):
    """Compiled Triton kernels on CUDA at a realistic size, against the chunked torch path."""
    B, d, n, k = 2048, 1280, 65536, 32
    x, W_enc, b_enc, W_dec = (t.cuda() for t in _inputs(B, d, n, dtype, seed=20))
    values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k, impl="triton")
    _assert_valid_topk(values, indices, x, W_enc, b_enc, k, tol=tol)
    loss = lambda out, xx: ((out.float() - xx.float()) ** 2).sum()  # noqa: E731
    out, grads = _grads(loss, x, W_enc, b_enc, W_dec, k, None, "triton")
    ref_out, ref_grads = _grads(loss, x, W_enc, b_enc, W_dec, k, None, "chunked")
    if dtype == torch.float32:  # same selection in fp32: compare everything
        assert _rel_err(out, ref_out) <= tol
        for got, want in zip(grads, ref_grads):
            assert _rel_err(got, want) <= tol
