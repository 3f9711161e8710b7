"""Kernel benchmarks under pytest-benchmark: ``python -m pytest bench/test_bench_kernels.py --benchmark-only -q``.

Small shapes so the suite takes minutes on a 2-core CPU. Each benchmark also checks its
result against a plain fp32 reference, so a fast but wrong case fails instead of being timed.
sparsify cases skip with the reason when sparsify is not installed. The cases are the installed
suite's (``sae_engine.benchmarks.kernels``, the table of ``sae-engine bench kernels``).
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

from sae_engine.benchmarks import kernels as kb
from sae_engine.benchmarks.harness import Unavailable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {
    "float32": kb.Shape(512, 320, 8192, 32, "float32"),
    "bfloat16": kb.Shape(512, 320, 8192, 32, "bfloat16"),
}
# Tolerances on values/outputs relative to the largest reference magnitude.
RTOL = {"float32": 1e-4, "bfloat16": 2e-2}


@pytest.fixture(scope="module", params=list(SHAPES))
def inputs(request: pytest.FixtureRequest) -> kb.Inputs:
    return kb.make_inputs(SHAPES[request.param], DEVICE)


@pytest.fixture(scope="module")
def inputs_fp32() -> kb.Inputs:
    return kb.make_inputs(SHAPES["float32"], DEVICE)


def _case(group: str, name: str, inp: kb.Inputs) -> Callable[[], Any]:
    try:
        return kb.build_case(group, name, inp)
    except Unavailable as err:
        pytest.skip(str(err))


def _measure(benchmark: Any, fn: Callable[[], Any]) -> Any:
    """A few rounds after one warm-up: enough for a stable median at these sizes."""
    return benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


def _assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() or 1.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3g} > {rtol} x {scale:.3g}"


def _reference_pre(inp: kb.Inputs) -> torch.Tensor:
    """fp32 pre-activations [B, n] of the same (possibly bf16) weights."""
    return inp.x.float() @ inp.W_enc.float().T + inp.b_enc.float()


@pytest.mark.parametrize("name", kb.CASES["encoder"])
def test_encoder(benchmark: Any, name: str, inputs: kb.Inputs) -> None:
    out = _measure(benchmark, _case("encoder", name, inputs))
    rtol = RTOL[inputs.shape.dtype]
    if name.startswith("gemm"):
        rows = out.shape[0]  # gemm_chunked returns its last chunk
        want = inputs.x[-rows:].float() @ inputs.W_enc.float().T
        _assert_close(out, want, rtol, name)
        return
    values, indices = out
    pre = _reference_pre(inputs)
    want = pre.topk(inputs.shape.k, dim=1).values.relu()
    got = values.float().sort(dim=1, descending=True).values  # sparsify's topk is unsorted
    _assert_close(got, want, rtol, f"{name} top-k values")
    # The indices must point at those values (not merely some set of equal size).
    _assert_close(pre.gather(1, indices).relu(), values, rtol, f"{name} values at indices")


@pytest.mark.parametrize("name", kb.CASES["decoder"])
def test_decoder(benchmark: Any, name: str, inputs: kb.Inputs) -> None:
    out = _measure(benchmark, _case("decoder", name, inputs))
    want = torch.einsum("bk,bkd->bd", inputs.values.float(), inputs.W_dec.float()[inputs.indices])
    _assert_close(out, want, RTOL[inputs.shape.dtype], name)


@pytest.fixture(scope="module")
def reference_grads(inputs_fp32: kb.Inputs) -> dict[str, torch.Tensor]:
    return kb.build_case("backward", "torch", inputs_fp32)()


@pytest.mark.parametrize("name", kb.CASES["backward"])
def test_backward(
    benchmark: Any, name: str, inputs_fp32: kb.Inputs, reference_grads: dict[str, torch.Tensor]
) -> None:
    grads = _measure(benchmark, _case("backward", name, inputs_fp32))
    for param, want in reference_grads.items():
        _assert_close(grads[param], want, 1e-3, f"{name} grad {param}")
