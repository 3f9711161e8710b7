"""A TorchSAE split over a data x latent mesh, applied from outside.

Each rank holds a plain ``TorchSAE`` of its own latent rows ``[lo, hi)`` (parameters, Adam
moments, firing statistics), given a ``MeshSplit`` for what crosses ranks; the plain backend
never sees a rank. What crosses ranks, and only that:

* selection: the exact sharded top-k (``selection.sharded_topk``), so codes carry global
  indices, equal to one process's; BatchTopK's cutoff is taken over the whole global batch;
* decoding: each rank decodes the winners it owns, partial reconstructions are summed over
  ``latent``; the error is then the same on every latent rank, and each rank forms the sparse
  gradients of its own rows;
* batch sums (variance, losses) over ``data``, the b_dec gradient's encoder part over ``latent``;
* gradients: summed over ``data`` in three collectives (``grad_sum``: the dense ones bucketed
  and overlapped with the row-sparse exchange, touched rows or dense, whichever sends fewer
  bytes), clipped by the global norm over all shards, then the plain backend's own
  optimizer and decoder-norm step run on its rows;
* AuxK: dead latents per shard, the aux top-k over them by the same exact sharded selection.

Data rank r trains on rows [r B/D, (r + 1) B/D) of each global batch of B vectors.
"""
from __future__ import annotations

import dataclasses

import torch

from sae_kernels import EMPTY

from ..config import RunConfig
from ..training.torch_backend import TorchSAE
from .comm import Comm
from .grad_sum import sum_over_data
from .init_rows import initial_rows
from .mesh import ParallelMesh
from .selection import owned, sharded_decode, sharded_topk


class MeshSplit:
    """``torch_backend.StepSplit`` over a mesh: this rank holds latents [lo, hi) and b of the
    batch's b * D rows; see the module docstring."""

    def __init__(self, data: Comm, latent: Comm, n_latents: int, lo: int, hi: int, impl: str = "auto") -> None:
        self.data, self.latent, self.lo, self.hi, self.impl = data, latent, lo, hi, impl
        self.n_latents = n_latents

    def select(self, x, W_enc, b_enc, k, row_ids=None):
        ids = torch.arange(self.lo, self.hi, device=x.device) if row_ids is None else row_ids + self.lo
        return sharded_topk(x, W_enc, b_enc, k, ids, self.latent, impl=self.impl)

    def decode_sum(self, values, indices, W_dec):
        return sharded_decode(values, indices, W_dec, self.lo, self.latent)

    def owned(self, indices):
        return owned(indices, self.lo, self.hi)

    def latent_sum(self, t):
        return self.latent.all_reduce(t)

    def batch_candidates(self, values):
        return self.data.all_gather(values.float().flatten()).flatten()

    def batch_sum(self, t):
        return self.data.all_reduce(t.sum().reshape(1)).reshape(())

    def batch_mean(self, t):
        return self.batch_sum(t) / (t.shape[0] * self.data.size)

    def total_variance(self, y):
        mean = self.data.all_reduce(y.sum(dim=0)) / (y.shape[0] * self.data.size)
        return self.batch_sum((y - mean).pow(2))


class ShardedTorchSAE:
    """The backend protocol over a mesh; see the module docstring. x: [b, d_in] this rank's rows."""

    def __init__(self, config: RunConfig, mesh: ParallelMesh, impl: str = "auto") -> None:
        self.config, self.mesh = config, mesh
        m = config.model
        self.lo, self.hi = mesh.latent_range(m.n_latents)
        self.data, self.latent = mesh.data_comm, mesh.latent_comm
        local = dataclasses.replace(config, model=dataclasses.replace(m, n_latents=self.hi - self.lo))
        self.plain = TorchSAE(local, mesh.device, config.train.precision_resolved,
                              split=MeshSplit(self.data, self.latent, m.n_latents, self.lo, self.hi, impl))
        rows = initial_rows(m.n_latents, m.d_in, m.target_dim, m.is_transcoder, config.train.seed, self.lo, self.hi)
        for name, value in rows.items():
            self.plain.params[name].copy_(value)

    # -- the protocol's plain parts ------------------------------------------------------------

    @property
    def adam_count(self) -> int:
        return self.plain.adam_count

    @property
    def aux_active(self) -> bool:
        return self.plain.aux_active

    @aux_active.setter
    def aux_active(self, value: bool) -> None:
        self.plain.aux_active = value

    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Scales and b_dec from a sample [N, d] that every rank holds whole (replicated results)."""
        self.plain.initialize(x, y)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensors: its rows of W_enc, b_enc, W_dec and their moments, replicated ones whole."""
        return self.plain.state_tensors()

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_count: int, aux_active: bool) -> None:
        self.plain.load_state_tensors(tensors, adam_count, aux_active)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sparse code of raw activations x [b, d_in]; the same on every latent rank."""
        return self.plain.encode(x)

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """FVU and L0 on held-out data that every rank holds whole (no data collective)."""
        return self.plain.evaluate(x, y)

    # -- training ------------------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        """One step on this data rank's rows x [b, d_in], y [b, d_out] of the global batch."""
        metrics, grads, (values, indices) = self.loss_and_grads(x, y)
        grads = sum_over_data(grads, self.data, self.hi - self.lo, allow_dense=self.config.train.optimizer == "adam")
        factor = None
        if self.config.train.grad_clip is not None:  # the global norm: every shard's rows, the replicated rest once
            rows, dense = self.plain.gradient_squares(grads)
            sharded = self.latent.all_reduce(rows.sum().reshape(1)).reshape(())
            factor = self.plain.clip_factor((sharded + dense.sum()).sqrt())
        self.plain.apply_gradients(grads, lr, factor)
        fired = self.data.all_gather(torch.where(values > 0, indices, EMPTY)).flatten(0, 1)
        self.plain.track_firing(owned(fired, self.lo, self.hi), fired.shape[0])
        return metrics

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor):
        """Forward and sparse backward of this rank's rows; gradients not yet summed over data.

        Returns (metrics over the global batch, grads by name with this rank's local rows, the
        main code with global indices [b, k]).
        """
        return self.plain.loss_and_grads(x, y)

    # -- statistics ----------------------------------------------------------------------------

    def latent_stats(self, tokens: int) -> dict[str, float]:
        """Dead and dense fractions over all shards; resets the firing counts of the window."""
        m = self.config.model
        buffers = self.plain.buffers
        n_local = self.hi - self.lo
        dead = (buffers["since_fired"][:n_local] > m.dead_tokens).sum()
        dense = (buffers["fire_count"][:n_local].float() / max(tokens, 1) > 0.1).sum()
        counts = self.latent.all_reduce(torch.stack([dead, dense]).float())
        buffers["fire_count"].zero_()
        self.plain.aux_active = bool(counts[0] > 0)
        return {"dead_fraction": counts[0].item() / m.n_latents, "dense_fraction": counts[1].item() / m.n_latents}

