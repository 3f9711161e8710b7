"""The exact sharded top-k: L processes (gloo) select what one process's topk_encode selects.

Each world size runs in one set of spawned processes (torchrun's environment, a free port, a
deadline), over random, tie-heavy, negative and fewer-than-k-eligible inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import sae_kernels
from sae_engine.parallel_config import ParallelConfig, latent_ranges
from sae_engine.parallel.launch import run_local
from sae_engine.parallel.mesh import build_mesh
from sae_engine.parallel.selection import merge_candidates, sharded_decode, sharded_topk


def _cases() -> list[dict]:
    """Inputs with the implementation whose tie rule the sharded result must reproduce."""
    g = torch.Generator().manual_seed(0)
    cases = []

    def ints(*shape, low=-1, high=2):
        return torch.randint(low, high, shape, generator=g).float()

    for impl in ("reference", "chunked"):  # random floats: no ties
        cases.append(dict(name=f"random-{impl}", impl=impl, k=8, mask=None, x=torch.randn(48, 24, generator=g),
                          W=torch.randn(103, 24, generator=g), b=torch.randn(103, generator=g)))
    for impl in ("reference", "triton"):  # small integers: exact ties everywhere
        cases.append(dict(name=f"ties-{impl}", impl=impl, k=10, mask=None, x=ints(32, 16), W=ints(61, 16), b=ints(61)))
    # Every pre-activation below zero: all values 0, the order comes from the pre-activations.
    cases.append(dict(name="negative", impl="reference", k=7, mask=None, x=ints(32, 16), W=ints(61, 16),
                      b=ints(61, low=-40, high=-30)))
    mask = torch.zeros(61, dtype=torch.bool)
    mask[[3, 4, 40, 59]] = True  # four eligible latents, on some ranks none
    cases.append(dict(name="fewer-than-k", impl="reference", k=9, mask=mask, x=ints(32, 16), W=ints(61, 16), b=ints(61)))
    cases.append(dict(name="k-above-shard", impl="reference", k=6, mask=None, x=ints(20, 16), W=ints(10, 16), b=ints(10)))
    return cases


def _select_on_ranks(latent: int, cases: list[dict]) -> list[tuple]:
    mesh = build_mesh(ParallelConfig(data=1, latent=latent), 10, "cpu", timeout_s=60)
    out = []
    for case in cases:
        n = case["W"].shape[0]
        lo, hi = mesh.latent_range(n)
        mask = None if case["mask"] is None else case["mask"][lo:hi]
        values, indices = sharded_topk(case["x"], case["W"][lo:hi], case["b"][lo:hi], case["k"], torch.arange(lo, hi),
                                       mesh.latent_comm, latent_mask=mask, impl=case["impl"])
        recon = sharded_decode(values, indices, case["W"][lo:hi], lo, mesh.latent_comm)
        out.append((values, indices, recon))
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("latent", [2, 3, 4])
def test_sharded_selection_equals_one_process(latent):
    cases = _cases()
    results = run_local(_select_on_ranks, latent, latent, cases, timeout=120)
    for case, *per_rank in zip(cases, *results):
        want_v, want_i = sae_kernels.topk_encode(case["x"], case["W"], case["b"], case["k"], latent_mask=case["mask"],
                                                 impl=case["impl"])
        want_recon = sae_kernels.sparse_decode(want_v, want_i, case["W"])
        for rank, (values, indices, recon) in enumerate(per_rank):
            where = f"{case['name']}, rank {rank} of {latent}"
            assert torch.equal(indices, want_i), where
            assert torch.equal(values, want_v), where
            # Partial sums over ranks add in another order: fp32 rounding only.
            torch.testing.assert_close(recon, want_recon, rtol=1e-5, atol=1e-5, msg=where)
    assert any((case["mask"] is not None) for case in cases)


def test_merge_orders_ties_by_index_and_empties_last():
    keys = torch.tensor([[1.0, 2.0, float("-inf"), 2.0, -0.5, 1.0]])
    indices = torch.tensor([[9, 7, -1, 3, 5, 2]])
    values, chosen = merge_candidates(keys, indices, 6)
    assert chosen.tolist() == [[3, 7, 2, 9, 5, -1]]
    assert values.tolist() == [[2.0, 2.0, 1.0, 1.0, 0.0, 0.0]]


def test_latent_ranges_cover_uneven_n():
    assert latent_ranges(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert latent_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]
    for n, parts in ((3, 4), (5, 4)):  # 5 over 4: 2, 2, 1 and an empty rank
        with pytest.raises(ValueError, match=f"cannot split {n} latents over {parts} ranks"):
            latent_ranges(n, parts)


def test_decoder_backward_of_a_code_wider_than_the_shard():
    """A rank's part of a k-wide code on fewer than k rows (EMPTY elsewhere) backpropagates."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 8, generator=g)
    indices = torch.tensor([[2, -1, -1, 0, -1, 3], [-1, -1, -1, -1, -1, 1]])
    values = torch.rand(2, 6, generator=g)
    grad_out = torch.randn(2, 8, generator=g)
    grads = sae_kernels.sparse_decode_backward(grad_out, values, indices, W)
    want = torch.einsum("bd,bkd->bk", grad_out, W[indices.clamp_min(0)]) * (indices >= 0)
    torch.testing.assert_close(grads.dvalues, want)
