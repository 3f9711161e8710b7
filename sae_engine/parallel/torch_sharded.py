"""A TorchSAE split over a data x latent mesh: the plain backend with a ``MeshSplit``.

Each rank holds a plain ``TorchSAE`` of its own latent rows ``[lo, hi)`` of the whole model
(parameters, Adam moments, firing statistics), drawn as one process would draw them; its one
training step sends what crosses ranks through the ``MeshSplit``, and only that:

* selection: the exact sharded top-k (``selection.sharded_topk``), so codes carry global
  indices, equal to one process's; BatchTopK's cutoff is taken over the whole global batch;
* decoding: each rank decodes the winners it owns, partial reconstructions are summed over
  ``latent``; the error is then the same on every latent rank, and each rank forms the sparse
  gradients of its own rows;
* batch sums (variance, losses) over ``data``, the b_dec gradient's encoder part over ``latent``;
* gradients: summed over ``data`` in three collectives (``grad_sum``: the dense ones bucketed
  and overlapped with the row-sparse exchange, touched rows or dense, whichever sends fewer
  bytes), clipped by the global norm (row parameters' squares summed over ``latent``), then
  the optimizer and decoder-norm step run on the rank's rows;
* AuxK: dead latents per shard, the aux top-k over them by the same exact sharded selection;
* statistics: the batch's fired latents gathered over ``data``; dead and dense counts summed
  over ``latent``.

Data rank r trains on rows [r B/D, (r + 1) B/D) of each global batch of B vectors; ``initialize``
and ``evaluate`` read a sample every rank holds whole.
"""
from __future__ import annotations

import torch

from ..config import RunConfig
from ..training.torch_backend import Grads, TorchSAE
from .comm import Comm
from .grad_sum import sum_over_data
from .mesh import ParallelMesh
from .selection import owned, sharded_decode, sharded_topk


class MeshSplit:
    """``torch_backend.StepSplit`` over a mesh: this rank holds latents [lo, hi) and b of the
    batch's b * D rows; see the module docstring. impl: ``sae_kernels.topk_encode``'s."""

    def __init__(self, data: Comm, latent: Comm, lo: int, hi: int, impl: str = "auto") -> None:
        self.data, self.latent, self.lo, self.hi, self.impl = data, latent, lo, hi, impl

    def select(self, x, W_enc, b_enc, k, row_ids=None):
        ids = torch.arange(self.lo, self.hi, device=x.device) if row_ids is None else row_ids + self.lo
        return sharded_topk(x, W_enc, b_enc, k, ids, self.latent, impl=self.impl)

    def decode_sum(self, values, indices, W_dec):
        return sharded_decode(values, indices, W_dec, self.lo, self.latent)

    def owned(self, indices):
        return owned(indices, self.lo, self.hi)

    def latent_sum(self, t):
        return self.latent.all_reduce(t)

    def gather_batch(self, t):
        return self.data.all_gather(t).flatten(0, 1)

    def batch_sum(self, t):
        return self.data.all_reduce(t.sum().reshape(1)).reshape(())

    def batch_mean(self, t):
        return self.batch_sum(t) / (t.shape[0] * self.data.size)

    def total_variance(self, y):
        mean = self.data.all_reduce(y.sum(dim=0)) / (y.shape[0] * self.data.size)
        return self.batch_sum((y - mean).pow(2))

    def sum_gradients(self, grads: Grads, allow_dense: bool) -> Grads:
        return sum_over_data(grads, self.data, self.hi - self.lo, allow_dense)


def sharded_torch_backend(config: RunConfig, mesh: ParallelMesh, precision: str, impl: str = "auto") -> TorchSAE:
    """This rank's ``TorchSAE`` of ``config`` over ``mesh``, computing in ``precision`` ("bf16"
    or "fp32"): the latent rows ``mesh.latent_range(n)``, on ``mesh.device``."""
    lo, hi = mesh.latent_range(config.model.n_latents)
    split = MeshSplit(mesh.data_comm, mesh.latent_comm, lo, hi, impl)
    return TorchSAE(config, mesh.device, precision, split=split)
