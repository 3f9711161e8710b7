"""Sharded training equals one process: 20 steps on the same global batches, four meshes.

Tolerance: fp32 with rtol 1e-4 and atol 1e-5 on weights and Adam moments after 20 steps. The
sharded step adds the same numbers in other orders (reconstructions summed over latent ranks,
gradients over data ranks, the batch variance from partial sums), so each step's gradients
differ from one process's by fp32 rounding (about 1e-7 relative); Adam's update is bounded by
lr per step and depends smoothly on the gradient, so 20 steps at lr 1e-3 keep the weights
within a few 1e-6. Selections (and so the firing statistics, compared exactly) stay equal.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sae_kernels import RowSparseGrad

from sae_engine.checkpoints.keys import STATISTICS, is_row_param
from sae_engine.config import RunConfig
from sae_engine.parallel_config import ParallelConfig, latent_ranges
from sae_engine.parallel.grad_sum import sum_over_data
from sae_engine.parallel.launch import run_local
from sae_engine.parallel.mesh import build_mesh
from sae_engine.parallel.torch_sharded import sharded_torch_backend
from sae_engine.training.backend import SAEBackend
from sae_engine.training.torch_backend import TorchSAE

STEPS, BATCH, LR = 20, 32, 1e-3


def _configs() -> dict[str, RunConfig]:
    base = {"data": {"synthetic": {"tokens": 4096}, "buffer_size": 1024, "eval_tokens": 0},
            "train": {"batch_size": BATCH, "lr": LR, "warmup_steps": 0, "precision": "fp32", "device": "cpu"}}
    models = {
        # Dead latents after 64 tokens: AuxK runs from the first statistics on.
        "topk": {"d_in": 16, "n_latents": 45, "k": 4, "dead_tokens": 64, "k_aux": 8, "multi_topk": True},
        "batchtopk": {"d_in": 16, "n_latents": 38, "k": 3, "kind": "batchtopk", "dead_tokens": 64},
        "transcoder": {"d_in": 16, "d_out": 12, "n_latents": 41, "k": 5, "skip_connection": True},
        # The prefix of 23 latents straddles the latent ranks at L = 2 (rank 1 holds 3 of them) and L = 4.
        "matryoshka": {"d_in": 16, "n_latents": 40, "k": 3, "kind": "matryoshka_batchtopk",
                       "matryoshka_prefixes": [5, 23, 40], "dead_tokens": 64},
    }
    # The transcoder's clipping binds: its global norm sums every shard's row gradients over latent ranks.
    train = {"batchtopk": {"optimizer": "row_sparse_adam"}, "transcoder": {"grad_clip": 0.05}}
    out = {}
    for name, model in models.items():
        raw = {**base, "model": model, "train": {**base["train"], **train.get(name, {})}}
        out[name] = RunConfig.from_dict(raw)
    return out


def _batches(config: RunConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    width = config.model.d_in + (config.model.d_out or 0)
    basis = torch.randn(6, width, generator=g)
    return torch.randn(STEPS, BATCH, 6, generator=g) @ basis + 0.1 * torch.randn(STEPS, BATCH, width, generator=g)


def _train(sae, config: RunConfig, rows: slice) -> None:
    """The schedule both sides run: init from batch 0, statistics every 5 steps."""
    d_in = config.model.d_in
    batches = _batches(config)
    sample = batches[0]
    sae.initialize(sample[:, :d_in], sample[:, d_in:] if config.model.is_transcoder else sample)
    for step, batch in enumerate(batches):
        batch = batch[rows]
        x, y = batch[:, :d_in], batch[:, d_in:] if config.model.is_transcoder else batch
        sae.train_step(x, y, LR)
        if (step + 1) % 5 == 0:
            sae.latent_stats(5 * BATCH)


def _train_on_meshes(meshes: list[tuple[int, int]], configs: dict[str, RunConfig]) -> dict:
    out = {}
    for data, latent in meshes:
        # One mesh for every model (the smallest n bounds the latent split).
        mesh = build_mesh(ParallelConfig(data, latent), min(c.model.n_latents for c in configs.values()), "cpu", timeout_s=60)
        for name, config in configs.items():
            sae = sharded_torch_backend(config, mesh, "fp32")
            lo, hi = mesh.latent_range(config.model.n_latents)
            assert isinstance(sae, SAEBackend) and sae.n_rows == hi - lo
            assert sae.config.model.n_latents == config.model.n_latents  # the whole model, not this rank's rows
            b = BATCH // data
            _train(sae, config, slice(mesh.data_rank * b, (mesh.data_rank + 1) * b))
            out[(data, latent, name)] = (mesh.data_rank, mesh.latent_rank, sae.state_tensors(), sae.adam_count)
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("meshes", [[(1, 2), (2, 1)], [(2, 2), (1, 4)]], ids=["1x2,2x1", "2x2,1x4"])
def test_sharded_training_equals_one_process(meshes):
    configs = _configs()
    world = meshes[0][0] * meshes[0][1]
    results = run_local(_train_on_meshes, world, meshes, configs, timeout=240)
    assert_equal_to_one_process(results, meshes, configs)


def assert_equal_to_one_process(results: list, meshes: list[tuple[int, int]], configs: dict[str, RunConfig],
                                row_keys: tuple[str, ...] = ()) -> None:
    """Every rank's state after ``_train_on_meshes`` equals its rows of one process's (see the module
    docstring). row_keys: per-latent tensors beyond ``keys.is_row_param``'s, compared by rows too."""
    for name, config in configs.items():
        single = TorchSAE(config, torch.device("cpu"))
        _train(single, config, slice(None))
        want = single.state_tensors()
        n = config.model.n_latents
        for data, latent in meshes:
            shards = [r[(data, latent, name)] for r in results]
            where = f"{name} at {data}x{latent}"
            ranges = latent_ranges(n, latent)
            for data_rank, latent_rank, state, count in shards:
                lo, hi = ranges[latent_rank]
                assert count == STEPS, where
                for key, value in want.items():
                    if key in STATISTICS:
                        # Integer statistics: equal selections give equal counts (slot n: empties).
                        assert torch.equal(state[key][: hi - lo], value[lo:hi]), f"{where}: {key}"
                    elif is_row_param(key) or key in row_keys:
                        torch.testing.assert_close(state[key], value[lo:hi], rtol=1e-4, atol=1e-5, msg=f"{where}: {key}")
                    else:
                        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{where}: {key}")
            # Data ranks hold bitwise-identical copies of their latent shard.
            by_latent: dict[int, dict] = {}
            for data_rank, latent_rank, state, _ in shards:
                first = by_latent.setdefault(latent_rank, state)
                for key in state:
                    assert torch.equal(state[key], first[key]), f"{where}: {key} differs across data ranks"


def _rank_grads(rank: int, n: int, d_in: int, d_out: int, shared: bool) -> dict:
    """A data rank's gradients: touched rows drawn per rank, W_dec's the same as W_enc's when shared."""
    g = torch.Generator().manual_seed(rank)
    enc_rows = torch.randperm(n, generator=g)[: 3 + 2 * rank].sort().values
    dec_rows = enc_rows if shared else torch.randperm(n, generator=g)[: 4 + rank].sort().values
    return {"W_enc": RowSparseGrad(enc_rows, torch.randn(len(enc_rows), d_in, generator=g),
                                   torch.randn(len(enc_rows), generator=g)),
            "W_dec": RowSparseGrad(dec_rows, torch.randn(len(dec_rows), d_out, generator=g)),
            "b_dec": torch.randn(d_out, generator=g), "W_skip": torch.randn(d_out, d_in, generator=g)}


def _sum_on_ranks(n: int, shared_on: list[bool], allow_dense: bool):
    mesh = build_mesh(ParallelConfig(len(shared_on), 1), n, "cpu", timeout_s=60)
    rank = mesh.data_rank
    summed = sum_over_data(_rank_grads(rank, n, 5, 3, shared_on[rank]), mesh.data_comm, n, allow_dense)
    dist.destroy_process_group()
    dense = {name: (g.rows, g.to_dense(n), g.bias_to_dense(n) if g.bias_grad is not None else None)
             if isinstance(g, RowSparseGrad) else g for name, g in summed.items()}
    return dense, mesh.data_comm.collectives


@pytest.mark.parametrize("shared_on,allow_dense,n", [([True, False, True], False, 40), ([True, True], True, 40),
                                                      ([True, True], True, 6)],
                         ids=["rows-mixed", "rows-shared", "dense"])
def test_gradients_summed_over_data_in_three_collectives(shared_on, allow_dense, n):
    results = run_local(_sum_on_ranks, len(shared_on), n, shared_on, allow_dense, timeout=60)
    every = [_rank_grads(rank, n, 5, 3, shared) for rank, shared in enumerate(shared_on)]
    want_rows = {name: torch.unique(torch.cat([g[name].rows for g in every])) for name in ("W_enc", "W_dec")}
    for summed, collectives in results:
        assert collectives == 3  # the dense bucket, the row counts, the rows (or their dense sum)
        for name in ("b_dec", "W_skip"):
            torch.testing.assert_close(summed[name], sum(g[name] for g in every))
        for name in ("W_enc", "W_dec"):
            rows, grad, bias = summed[name]
            # n = 6: every row sent densely is fewer bytes than the touched rows with their ids
            assert torch.equal(rows, torch.arange(n) if n == 6 else want_rows[name]), name
            torch.testing.assert_close(grad, sum(g[name].to_dense(n) for g in every))
        torch.testing.assert_close(summed["W_enc"][2], sum(g["W_enc"].bias_to_dense(n) for g in every))
