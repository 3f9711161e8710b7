"""A TorchSAE split over a data x latent mesh, applied from outside.

Each rank holds a plain ``TorchSAE`` of its own latent rows ``[lo, hi)`` (parameters, Adam
moments, firing statistics): the plain backend never sees a rank. This wrapper replaces what
crosses ranks, and only that:

* selection: the exact sharded top-k (``selection.sharded_topk``), so codes carry global
  indices, equal to one process's; BatchTopK's cutoff is taken over the whole global batch;
* decoding: each rank decodes the winners it owns, partial reconstructions are summed over
  ``latent``; the error is then the same on every latent rank, and each rank forms the sparse
  gradients of its own rows;
* batch sums (variance, losses, the b_dec gradient's encoder part) over ``data`` and ``latent``;
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

from ..backend import code_width, selection_width
from ..config import RunConfig
from ..torch_backend import TorchSAE
from .grad_sum import sum_over_data
from .init_rows import initial_rows
from .mesh import ParallelMesh
from .selection import owned, sharded_decode, sharded_topk


class ShardedTorchSAE:
    """The backend protocol over a mesh; see the module docstring. x: [b, d_in] this rank's rows."""

    def __init__(self, config: RunConfig, mesh: ParallelMesh, impl: str = "auto") -> None:
        self.config, self.mesh, self.impl = config, mesh, impl
        m = config.model
        self.lo, self.hi = mesh.latent_range(m.n_latents)
        local = dataclasses.replace(config, model=dataclasses.replace(m, n_latents=self.hi - self.lo))
        self.plain = TorchSAE(local, mesh.device, config.train.precision_resolved)
        rows = initial_rows(m.n_latents, m.d_in, m.target_dim, m.is_transcoder, config.train.seed, self.lo, self.hi)
        for name, value in rows.items():
            self.plain.params[name].copy_(value)
        self.row_ids = torch.arange(self.lo, self.hi, device=mesh.device)
        self.data, self.latent = mesh.data_comm, mesh.latent_comm

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

    # -- selection and decoding across ranks ---------------------------------------------------

    def _select(self, x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
                row_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sharded_topk(x_c, W_enc, b_enc, k, row_ids, self.latent, impl=self.impl)

    def _encode(self, x_c: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The global code of the encoder input [b, d_in]. -> values, global indices [b, k']."""
        m = self.config.model
        W_enc, b_enc, _ = self.plain.compute_weights()
        width = selection_width(m) if training else code_width(m)
        values, indices = self._select(x_c.to(self.plain.compute_dtype), W_enc, b_enc, width, self.row_ids)
        if m.kind == "batchtopk":  # the cutoff over the global batch: every data rank's candidates
            every = self.data.all_gather(values.float().flatten()).flatten() if training else None
            values, indices = self.plain.batch_topk(values, indices, training, every)
        return values, indices

    def _decode(self, values: torch.Tensor, indices: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        """Reconstruction of a global code [b, k], with b_dec and the skip connection. -> [b, d_out] fp32."""
        _, _, W_dec = self.plain.compute_weights()
        return self.plain.add_decoder_biases(sharded_decode(values, indices, W_dec, self.lo, self.latent), xn)

    def _batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of ``t`` over this rank's rows and every data rank's (0-d)."""
        return self.data.all_reduce(t.sum().reshape(1)).reshape(())

    def _total_variance(self, y: torch.Tensor) -> torch.Tensor:
        """Squared deviation from the global batch mean, summed over the global batch. y: [b, d]."""
        count = y.shape[0] * self.data.size
        mean = self.data.all_reduce(y.sum(dim=0)) / count
        return self._batch_sum((y - mean).pow(2))

    # -- inference -----------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global sparse code of raw activations x [b, d_in]; the same on every latent rank."""
        xn = self.plain.normalize_input(x.to(self.mesh.device))
        return self._encode(self.plain.encoder_input(xn), training=False)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """FVU and L0 on held-out data that every rank holds whole (no data collective)."""
        xn, yn = self.plain.normalize_input(x.to(self.mesh.device)), self.plain.normalize_target(y.to(self.mesh.device))
        values, indices = self._encode(self.plain.encoder_input(xn), training=False)
        recon = self._decode(values, indices, xn)
        total_variance = (yn - yn.mean(dim=0)).pow(2).sum()
        return {"eval_fvu": ((recon - yn).pow(2).sum() / total_variance).item(),
                "eval_l0": (values > 0).sum(dim=1).float().mean().item()}

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
        m = self.config.model
        plain = self.plain
        xn, yn = plain.normalize_input(x), plain.normalize_target(y)
        x_c = plain.encoder_input(xn)
        values, indices = self._encode(x_c, training=True)
        main_values, main_indices = (values[:, : m.k], indices[:, : m.k]) if m.multi_topk else (values, indices)
        error = self._decode(main_values, main_indices, xn) - yn
        total_variance = self._total_variance(yn)
        fvu = self._batch_sum(error.pow(2)) / total_variance
        loss = fvu
        dec_terms = [(error * (2 / total_variance), main_values, main_indices, True)]
        if m.multi_topk:
            error_multi = self._decode(values, indices, xn) - yn
            loss = loss + self._batch_sum(error_multi.pow(2)) / total_variance / 8
            dec_terms.append((error_multi * (2 / total_variance / 8), values, indices, True))
        aux_loss = torch.zeros((), device=x.device)
        aux = self._aux_term(x_c, error) if plain.aux_active and m.aux_coef > 0 else None
        if aux is not None:
            aux_loss, aux_term = aux
            loss = loss + m.aux_coef * aux_loss
            dec_terms.append(aux_term)

        local_terms = [(g, v, owned(i, self.lo, self.hi), shared) for g, v, i, shared in dec_terms]
        grads = plain.backward(xn, x_c, values, owned(indices, self.lo, self.hi), local_terms)
        if not m.is_transcoder:
            # The plain backward subtracts only this rank's part of the encoder's dx sum.
            decoder_part = sum(g for g, _, _, shared in dec_terms if shared).sum(dim=0)
            grads["b_dec"] = decoder_part - self.latent.all_reduce(decoder_part - grads["b_dec"])
        l0 = self._batch_sum((main_values > 0).float()) / (x.shape[0] * self.data.size)
        metrics = {"loss": loss, "fvu": fvu, "aux_loss": aux_loss, "l0": l0}
        return metrics, grads, (main_values, main_indices)

    def _aux_term(self, x_c: torch.Tensor, error: torch.Tensor):
        """AuxK over the dead latents of every shard; None when none is dead. -> (loss, decoder term)."""
        m = self.config.model
        dead = self.plain.dead_latents()
        total_dead = int(self.latent.all_reduce(torch.tensor([dead.numel()], device=x_c.device)).item())
        if total_dead == 0:
            return None
        W_enc, b_enc, W_dec = self.plain.compute_weights()
        aux_values, aux_indices = self._select(x_c.to(self.plain.compute_dtype), W_enc[dead], b_enc[dead],
                                               min(m.aux_k, total_dead), dead + self.lo)
        aux_recon = sharded_decode(aux_values, aux_indices, W_dec, self.lo, self.latent)
        residual = error.detach()
        residual_variance = self._total_variance(residual).clamp_min(1e-12)
        aux_error = aux_recon - residual
        aux_loss = self._batch_sum(aux_error.pow(2)) / residual_variance
        return aux_loss, (aux_error * (2 * m.aux_coef / residual_variance), aux_values, aux_indices, False)

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

