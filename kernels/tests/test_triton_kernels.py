"""Correctness of the Triton launchers against plain torch computed here.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (chosen
per call from the tensors' device), so shapes stay tiny and odd: B, d
and n are not multiples of the block sizes. The `gpu` class runs the compiled
kernels at benchmark-like shapes.

Error bounds. Integer-valued inputs make every product and fp32 sum exact in
fp32 and bf16, so those encoder tests demand bitwise-equal values and indices
(including the smaller-index-first tie-break). For random normal inputs the
kernel and the float64 reference see the same (bf16-rounded) inputs and differ
only by fp32 accumulation order: |err| <= 1e-5 * sum_i |x_i * w_i| for fp32 and
bf16 alike (bf16 products are exact in fp32). The selected set is checked by
comparing the returned values with the reference's top-k values and with the
reference pre-activations at the returned indices, within that bound.
"""

from __future__ import annotations

import pytest
import torch

from sae_kernels.triton_kernels import (
    MAX_K_PAD,
    decode,
    encode_topk,
    gather_dot,
    segment_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL = 1e-5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_topk(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, k: int):
    """float64 pre-activations and their top-k, ties broken by the smaller index."""
    pre = x.double().cpu() @ W.double().cpu().T
    if bias is not None:
        pre = pre + bias.double().cpu()
    order = torch.sort(-pre, dim=1, stable=True).indices[:, :k]
    return pre, pre.gather(1, order), order


def _int_inputs(B: int, d: int, n: int, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    x = torch.randint(-2, 3, (B, d), generator=g).to(dtype)
    W = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    bias = torch.randint(-4, 5, (n,), generator=g).float()
    return x, W, bias


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize(
    "B,d,n,k,dtype",
    [
        (37, 40, 300, 7, torch.float32),     # several splits, partial row block
        (5, 72, 300, 32, torch.bfloat16),    # bf16, k = K_PAD
        (1, 24, 50, 1, torch.float32),       # B=1, k=1, single split
        (9, 33, 50, 48, torch.bfloat16),     # k close to n
        (6, 24, 64, 64, torch.float32),      # k == n
        (3, 24, 300, 100, torch.bfloat16),   # K_PAD = 128 layout
        (2, 24, 300, 200, torch.float32),    # K_PAD = 256 layout
    ],
)
def test_encode_topk_exact_with_ties(B: int, d: int, n: int, k: int, dtype: torch.dtype) -> None:
    x, W, bias = _int_inputs(B, d, n, dtype, seed=B * 1000 + n + k)
    # Exact duplicate latents, some in another tile/split than their original.
    W[n - 1] = W[0]
    W[n // 2] = W[1]
    pre, idx = encode_topk(x.to(DEVICE), W.to(DEVICE), bias.to(DEVICE), k)
    _, ref_val, ref_idx = _ref_topk(x, W, bias, k)
    assert pre.dtype == torch.float32 and idx.dtype == torch.int64
    assert pre.shape == idx.shape == (B, k)
    torch.testing.assert_close(pre.cpu().double(), ref_val, rtol=0, atol=0)
    assert torch.equal(idx.cpu(), ref_idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_topk_random_within_bound(dtype: torch.dtype) -> None:
    B, d, n, k = 21, 56, 260, 16
    g = _gen(7)
    x = torch.randn(B, d, generator=g).to(dtype)
    W = torch.randn(n, d, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    pre, idx = encode_topk(x.to(DEVICE), W.to(DEVICE), bias.to(DEVICE), k)
    ref, ref_val, _ = _ref_topk(x, W, bias, k)
    tol = REL * (x.double().abs() @ W.double().abs().T).max().item()
    pre, idx = pre.cpu().double(), idx.cpu()
    assert torch.all(pre[:, :-1] >= pre[:, 1:])
    assert all(row.unique().numel() == k for row in idx)
    torch.testing.assert_close(pre, ref_val, rtol=0, atol=tol)
    torch.testing.assert_close(pre, ref.gather(1, idx), rtol=0, atol=tol)


def test_encode_topk_no_bias_matches_zero_bias() -> None:
    x, W, _ = _int_inputs(11, 30, 140, torch.float32, seed=3)
    pre, idx = encode_topk(x.to(DEVICE), W.to(DEVICE), None, 5)
    _, ref_val, ref_idx = _ref_topk(x, W, None, 5)
    assert torch.equal(pre.cpu().double(), ref_val)
    assert torch.equal(idx.cpu(), ref_idx)


def test_encode_topk_masked_bias_fewer_than_k_finite() -> None:
    B, d, n, k = 7, 24, 300, 12
    x, W, bias = _int_inputs(B, d, n, torch.float32, seed=11)
    live = torch.tensor([3, 77, 150, 151, 299])  # spread over splits
    bias_masked = torch.full((n,), float("-inf"))
    bias_masked[live] = bias[live]
    pre, idx = encode_topk(x.to(DEVICE), W.to(DEVICE), bias_masked.to(DEVICE), k)
    pre, idx = pre.cpu(), idx.cpu()
    _, ref_val, ref_idx = _ref_topk(x, W, bias_masked, live.numel())
    m = live.numel()
    assert torch.equal(pre[:, :m].double(), ref_val)
    assert torch.equal(idx[:, :m], ref_idx)
    assert torch.all(pre[:, m:] == float("-inf"))
    assert torch.all(idx[:, m:] == -1)


@pytest.mark.parametrize("late_wins", [False, True])
def test_encode_topk_threshold_skip_paths(late_wins: bool) -> None:
    # Many tiles per split; a bias ramp makes later tiles either always lose (the
    # insertion loop never runs after the first tile) or always win (k insertions
    # per tile, evicting everything kept so far).
    B, d, n, k = 4, 24, 1100, 8
    x, W, _ = _int_inputs(B, d, n, torch.float32, seed=5)
    ramp = torch.arange(n, dtype=torch.float32) * 1000.0
    bias = ramp if late_wins else -ramp
    pre, idx = encode_topk(x.to(DEVICE), W.to(DEVICE), bias.to(DEVICE), k)
    _, ref_val, ref_idx = _ref_topk(x, W, bias, k)
    assert torch.equal(pre.cpu().double(), ref_val)
    assert torch.equal(idx.cpu(), ref_idx)


def test_encode_topk_rejects_k_beyond_register_limit() -> None:
    x, W, bias = _int_inputs(2, 16, 600, torch.float32, seed=1)
    with pytest.raises(ValueError, match=str(MAX_K_PAD)):
        encode_topk(x.to(DEVICE), W.to(DEVICE), bias.to(DEVICE), MAX_K_PAD + 1)


# ----------------------------------------------------------------------------- decoder / backward


def _sparse_code(B: int, k: int, n: int, seed: int, dtype: torch.dtype):
    g = _gen(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)])
    idx[torch.rand(B, k, generator=g) < 0.25] = -1
    idx[0, :] = -1  # a fully empty row
    values = torch.randn(B, k, generator=g).to(dtype)
    return values, idx


def _ref_decode(values: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    live = idx >= 0
    rows = W.double()[idx.clamp(min=0)] * (values.double() * live)[..., None]
    return rows.sum(1)


@pytest.mark.parametrize(
    "B,k,n,d,vdtype,wdtype",
    [
        (13, 5, 50, 72, torch.float32, torch.float32),
        (6, 37, 90, 40, torch.bfloat16, torch.bfloat16),
        (1, 1, 60, 300, torch.float32, torch.bfloat16),
    ],
)
def test_decode(B: int, k: int, n: int, d: int, vdtype: torch.dtype, wdtype: torch.dtype) -> None:
    values, idx = _sparse_code(B, k, n, seed=B + k, dtype=vdtype)
    W = torch.randn(n, d, generator=_gen(2)).to(wdtype)
    out = decode(values.to(DEVICE), idx.to(DEVICE), W.to(DEVICE))
    assert out.dtype == torch.promote_types(vdtype, wdtype) and out.shape == (B, d)
    ref = _ref_decode(values, idx, W)
    scale = (values.double().abs() @ torch.ones(k, 1, dtype=torch.float64)) * W.double().abs().max()
    # fp32 accumulation (<= REL * scale) plus one bf16 ulp for a bf16 output (the
    # interpreter truncates on the fp32 -> bf16 cast, the GPU rounds to nearest).
    out_eps = 2.0**-7 if out.dtype == torch.bfloat16 else 0.0
    err = (out.cpu().double() - ref).abs()
    assert torch.all(err <= REL * scale + out_eps * ref.abs())
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_dot(dtype: torch.dtype) -> None:
    B, k, n, d = 9, 19, 70, 150
    _, idx = _sparse_code(B, k, n, seed=4, dtype=dtype)
    g = torch.randn(B, d, generator=_gen(5)).to(dtype)
    W = torch.randn(n, d, generator=_gen(6)).to(dtype)
    out = gather_dot(g.to(DEVICE), idx.to(DEVICE), W.to(DEVICE))
    assert out.dtype == torch.float32 and out.shape == (B, k)
    ref = torch.einsum("bd,bkd->bk", g.double(), W.double()[idx.clamp(min=0)]) * (idx >= 0)
    scale = torch.einsum("bd,bkd->bk", g.double().abs(), W.double().abs()[idx.clamp(min=0)])
    assert torch.all((out.cpu().double() - ref).abs() <= REL * scale + 1e-30)
    assert torch.all(out.cpu()[idx < 0] == 0)


def _ref_segment(coeff: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, n: int):
    live = idx >= 0
    lat = idx[live]
    b = torch.arange(idx.shape[0])[:, None].expand_as(idx)[live]
    c = coeff.double()[live]
    dense = torch.zeros(n, src.shape[1], dtype=torch.float64).index_add_(0, lat, c[:, None] * src.double()[b])
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, lat, c)
    absdense = torch.zeros(n, src.shape[1], dtype=torch.float64).index_add_(
        0, lat, (c[:, None] * src.double()[b]).abs())
    return torch.unique(lat), dense, sums, absdense


@pytest.mark.parametrize(
    "B,k,n,d,dtype",
    [(23, 6, 40, 72, torch.float32), (17, 9, 60, 290, torch.bfloat16)],
)
def test_segment_rows(B: int, k: int, n: int, d: int, dtype: torch.dtype) -> None:
    g = _gen(B * k)
    idx = torch.randint(0, n, (B, k), generator=g)  # repeats across and within rows
    idx[:, 0] = 3  # one long segment (spans several BLOCK_P chunks)
    idx[torch.rand(B, k, generator=g) < 0.2] = -1
    coeff = torch.randn(B, k, generator=g).to(dtype)
    src = torch.randn(B, d, generator=g).to(dtype)
    rows, grads, sums = segment_rows(coeff.to(DEVICE), idx.to(DEVICE), src.to(DEVICE))
    ref_rows, dense, ref_sums, absdense = _ref_segment(coeff, idx, src, n)
    assert torch.equal(rows.cpu(), ref_rows)
    assert grads.dtype == sums.dtype == torch.float32 and grads.shape == (ref_rows.numel(), d)
    assert torch.all((grads.cpu().double() - dense[ref_rows]).abs() <= REL * absdense[ref_rows] + 1e-30)
    abs_sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx[idx >= 0], coeff.double()[idx >= 0].abs())
    assert torch.all((sums.cpu().double() - ref_sums[ref_rows]).abs() <= REL * abs_sums[ref_rows] + 1e-30)

    # Deterministic: a second run is bitwise identical.
    assert torch.equal(segment_rows(coeff.to(DEVICE), idx.to(DEVICE), src.to(DEVICE))[1], grads)


def test_segment_rows_all_empty() -> None:
    idx = torch.full((4, 3), -1)
    coeff = torch.randn(4, 3)
    src = torch.randn(4, 20)
    rows, grads, sums = segment_rows(coeff.to(DEVICE), idx.to(DEVICE), src.to(DEVICE))
    assert rows.numel() == 0 and grads.shape == (0, 20) and sums.shape == (0,)


# ----------------------------------------------------------------------------- compiled, on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestCompiledLargeShapes:
    """Compiled kernels at benchmark-like shapes against torch on the same GPU."""

    B, d, n, k = 4096, 1280, 65536, 32

    def _inputs(self, dtype: torch.dtype):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(self.B, self.d, device="cuda", generator=g).to(dtype)
        W = (torch.randn(self.n, self.d, device="cuda", generator=g) / self.d**0.5).to(dtype)
        bias = torch.randn(self.n, device="cuda", generator=g) * 0.1
        bias[::7] = float("-inf")
        return x, W, bias

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_encode_topk(self, dtype: torch.dtype) -> None:
        x, W, bias = self._inputs(dtype)
        pre, idx = encode_topk(x, W, bias, self.k)
        ref = x.float() @ W.float().T + bias  # torch's own GEMM: a different summation order
        ref_val = torch.topk(ref, self.k, dim=1).values
        tol = 1e-5 * (x.float().abs() @ W.float().abs().T).amax().item()
        torch.testing.assert_close(pre, ref_val, rtol=0, atol=tol)
        torch.testing.assert_close(pre, ref.gather(1, idx), rtol=0, atol=tol)
        assert torch.all(idx % 7 != 0)

    def test_decode_gather_segment(self) -> None:
        x, W, bias = self._inputs(torch.bfloat16)
        values, idx = torch.topk(x.float() @ W.float().T + bias, self.k, dim=1)
        idx[:, -3:] = -1
        live = (idx >= 0).float()
        out = decode(values, idx, W)
        ref = torch.einsum("bk,bkd->bd", values * live, W.float()[idx.clamp(min=0)])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

        g = torch.randn_like(x)
        got = gather_dot(g, idx, W)
        want = torch.einsum("bd,bkd->bk", g.float(), W.float()[idx.clamp(min=0)]) * live
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)

        rows, grads, _ = segment_rows(values, idx, x)
        dense = torch.zeros(self.n, self.d, device="cuda").index_copy_(0, rows, grads)
        flat = idx.reshape(-1)
        keep = flat >= 0
        want = torch.zeros(self.n, self.d, device="cuda").index_add_(
            0, flat[keep], values.reshape(-1, 1)[keep] * x.float().repeat_interleave(self.k, 0)[keep])
        torch.testing.assert_close(dense, want, rtol=1e-4, atol=1e-3)
        assert torch.equal(segment_rows(values, idx, x)[1], grads)


def test_interpreted_launch_leaves_triton_language_as_it_was() -> None:
    # Interpreted and compiled launches share one process: the interpreter's patches of
    # triton.language must not outlive a launch, or kernels compiled later would be built with
    # the interpreter's semantics.
    import triton.language as tl

    def snapshot() -> dict:
        objects = [tl, tl.core, tl.standard, tl.math, tl.tensor, tl.dtype]
        return {(id(obj), key): value for obj in objects for key, value in vars(obj).items()}

    before = snapshot()
    x, W, bias = _int_inputs(3, 8, 40, torch.float32, seed=0)
    encode_topk(x, W, bias, 4)
    after = snapshot()
    assert all(after.get(key) is value for key, value in before.items())
    with pytest.raises(RuntimeError, match="outside of the scope of a kernel"):
        tl.standard.max(x)  # a compiled @triton.jit function refuses direct calls again
