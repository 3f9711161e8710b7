"""The JAX backend: a Flax NNX model and an optax optimizer, mirroring the PyTorch backend.

Model (``SparseAutoencoder``, shapes in latents n, input width d_in, target width d_out):
    ``nnx.Param``s W_enc [n, d_in], b_enc [n], W_dec [n, d_out] (unit-norm rows), b_dec [d_out],
    W_skip [d_out, d_in] for transcoders with a skip connection; beside them, state the optimizer
    never sees: ``LatentStat``s since_fired [n + 1], fire_count [n + 1] (int32; slot n absorbs
    empty and zero-valued code slots) and batchtopk_threshold [], and ``DataScale``s in_scale [],
    out_scale []. Codes and losses (FVU, Multi-TopK, Matryoshka prefixes, AuxK) are those of
    ``TorchSAE``, computed with ``sae_kernels.jax`` (``prefix_decode`` for every Matryoshka
    prefix in one pass; ``threshold_encode`` for JumpReLU, whose ``nnx.Param`` threshold [n] gets
    its rectangle-kernel pseudo-gradient through a surrogate term of zero value), whose custom
    VJPs make the backward sparse. The contract, the code
    widths and the compute precision are ``sae_engine.training.backend``'s.

Optimizer: ``optax.chain(clip_by_global_norm, scale_by_adam)`` with the learning rate applied
per step, i.e. ``optax.adam``'s rule. Row-sparse Adam keeps static shapes: ``row_sparse_adam``
computes Adam for every row, then keeps the new moments and a non-zero update only in the rows
of W_enc, b_enc and W_dec that a code of this step used; the others keep their parameters and
moments. That is the PyTorch backend's rule, though not its saving in work.

The training step (loss, gradient, decoder projection, clipping, Adam, decoder
renormalisation, firing statistics) is one ``jax.jit``-compiled function of the model's
``nnx.State`` and the optax state. Checkpoint tensors have ``TorchSAE.state_tensors``'s names
and dtypes (optax's ``ScaleByAdamState`` mu, nu and count become ``adam.m.*``, ``adam.v.*`` and
``adam_count``), so a run started in one backend resumes in the other. Batches arrive as torch
tensors from the ring buffer and cross over through DLPack without a copy.

Placement (``Layout``): by default the state lives on the devices of the batch it trains on,
replicated; a batch laid out over a ``jax.sharding.Mesh`` axis ("data") trains data-parallel,
XLA inserting the reductions. ``sae_engine.parallel.jax_mesh`` gives a layout from outside that also
splits the latents over a mesh axis; the model then holds its per-latent arrays padded to
``Layout.rows(n)`` rows (padding rows are never selected and stay zero; checkpoint tensors have
exactly n rows).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from sae_kernels import jax as kernels

from ..checkpoints.keys import ROW_PARAMS, STATISTICS, is_row_param
from ..config import ModelConfig, RunConfig, TrainConfig
from .backend import (AUX_VARIANCE_FLOOR, BATCHTOPK_THRESHOLD_RATE, JUMPRELU_INIT_THRESHOLD, LAYER_NORM_EPS,
                      MULTI_TOPK_WEIGHT,
                      ROW_NORM_FLOOR, code_width, latent_fractions, matryoshka_loss_weights, selection_width)
from .init import geometric_median, initial_weights, mean_squared_norm_scale
from .precision import resolve_precision

EMPTY = kernels.EMPTY
INT32_MAX = 2**31 - 1  # the firing statistics are int32 here (int64 in checkpoints): loading saturates them

Params = dict[str, jax.Array]


def to_jax(t: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array, through DLPack (no copy for contiguous CPU tensors)."""
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def to_torch(a: jax.Array) -> torch.Tensor:
    """A JAX array as a torch tensor (via numpy: bf16 and int64 safe)."""
    return torch.from_numpy(np.array(a))


def _layer_normalize(x: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
    """``init.layer_normalize`` in JAX: x [B, d] -> fp32 [B, d], zero mean and unit variance per row."""
    x = x.astype(jnp.float32)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _normalize_rows(W: jax.Array) -> jax.Array:
    """W [m, d] with unit-norm rows."""
    return W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), ROW_NORM_FLOOR)


def _row_mask(touched: jax.Array, ndim: int) -> jax.Array:
    """touched [n] as a mask broadcasting over an [n, ...] parameter of ``ndim`` axes."""
    return touched.reshape((-1,) + (1,) * (ndim - 1))


class LatentStat(nnx.Variable):
    """Per-latent statistics updated by the training step: firing and the BatchTopK threshold."""


class DataScale(nnx.Variable):
    """A normalisation scale for inputs or targets, fixed by ``JaxSAE.initialize``."""


def pad_to_rows(a: jax.Array, rows: int) -> jax.Array:
    """a [m, ...] with zero rows appended up to [rows, ...] (m <= rows)."""
    return jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)) if rows > a.shape[0] else a


class SparseAutoencoder(nnx.Module):
    """A TopK / BatchTopK SAE or transcoder (see the module docstring for its variables).

    ``kernels``: what computes codes (``sae_kernels.jax`` or a layout's mesh version); ``rows``:
    rows of W_enc, b_enc and W_dec, n or more (rows past n are padding, never selected).
    """

    def __init__(self, config: ModelConfig, seed: int, compute_dtype: jnp.dtype = jnp.float32,
                 kernels: Any = kernels, rows: int | None = None) -> None:
        self.config = config
        self.compute_dtype = compute_dtype
        self.kernels = kernels
        self.rows = rows or config.n_latents
        n, d_in, d_out = config.n_latents, config.d_in, config.target_dim
        weights = initial_weights(config, seed)  # every backend's, so all start identically
        self.W_enc = nnx.Param(pad_to_rows(jnp.asarray(weights["W_enc"].numpy()), self.rows))
        self.b_enc = nnx.Param(jnp.zeros(self.rows, jnp.float32))
        self.W_dec = nnx.Param(pad_to_rows(jnp.asarray(weights["W_dec"].numpy()), self.rows))
        self.b_dec = nnx.Param(jnp.zeros(d_out, jnp.float32))
        self.W_skip = nnx.Param(jnp.zeros((d_out, d_in), jnp.float32)) if config.skip_connection else None
        self.threshold = (nnx.Param(jnp.full(self.rows, JUMPRELU_INIT_THRESHOLD, jnp.float32))
                          if config.kind == "jumprelu" else None)
        self.since_fired = LatentStat(jnp.zeros(n + 1, jnp.int32))
        self.fire_count = LatentStat(jnp.zeros(n + 1, jnp.int32))
        self.batchtopk_threshold = LatentStat(jnp.zeros((), jnp.float32))
        self.in_scale = DataScale(jnp.ones((), jnp.float32))
        self.out_scale = DataScale(jnp.ones((), jnp.float32))

    def params(self) -> Params:
        """The parameters by name (W_skip only when present): the pytree optax works on."""
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    def set_params(self, params: Params) -> None:
        """Replace the parameters' values with ``params`` (names and shapes as ``params()``)."""
        state = nnx.state(self, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(self, state)

    # -- forward -------------------------------------------------------------------------------

    def normalize(self, x: jax.Array, scale: DataScale) -> jax.Array:
        """x [B, d] -> fp32 [B, d]: per-row layer norm, or times the dataset scale."""
        if self.config.normalize == "layernorm":
            return _layer_normalize(x)
        return x.astype(jnp.float32) * scale[...]

    def selectable(self, mask: jax.Array | None = None) -> jax.Array | None:
        """The latent mask [rows] for a selection: ``mask`` [n] (None: every latent) without the
        padding rows; None when there is neither."""
        n = self.config.n_latents
        if self.rows == n:
            return mask
        return pad_to_rows(jnp.ones(n, bool) if mask is None else mask, self.rows)

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """W_enc, b_enc, W_dec in the compute dtype."""
        cd = self.compute_dtype
        return self.W_enc[...].astype(cd), self.b_enc[...].astype(cd), self.W_dec[...].astype(cd)

    def encode(self, xn: jax.Array, training: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Sparse code of normalised input xn [B, d_in]. -> values [B, w], indices [B, w], encoder
        input [B, d_in]; w = ``selection_width`` in training (the Multi-TopK code's first k
        slots are the main code), ``code_width`` at inference (BatchTopK: with empty slots).

        BatchTopK keeps the B*k largest values in training, moving the inference threshold
        towards the smallest kept positive value; at inference it keeps those above the threshold.
        """
        m = self.config
        x_c = xn if m.is_transcoder else xn - self.b_dec[...]
        W_enc, b_enc, _ = self._weights()
        if m.kind == "jumprelu":
            code = self.threshold_code(x_c, band=False)
            return code.values, code.indices, x_c
        width = selection_width(m) if training else code_width(m)
        values, indices = self.kernels.topk_encode(x_c.astype(self.compute_dtype), W_enc, b_enc, width,
                                                   latent_mask=self.selectable())
        if m.batch_selection:
            threshold = self.batchtopk_threshold[...]
            if training:
                flat = values.astype(jnp.float32).reshape(-1)
                cutoff = jax.lax.top_k(flat, min(xn.shape[0] * m.k, flat.shape[0]))[0][-1]
                keep = values.astype(jnp.float32) >= cutoff
                smallest = jnp.min(jnp.where(keep & (values > 0), values.astype(jnp.float32), jnp.inf))
                target = jnp.where(jnp.isfinite(smallest), smallest, threshold)
                self.batchtopk_threshold[...] = threshold + BATCHTOPK_THRESHOLD_RATE * (target - threshold)
            else:
                keep = values.astype(jnp.float32) >= threshold
            values = values * keep
            indices = jnp.where(keep, indices, EMPTY)
        return values, indices, x_c

    def threshold_code(self, x_c: jax.Array, band: bool) -> Any:
        """JumpReLU code of the encoder input x_c [B, d_in]: ``threshold_encode`` with ``row_cap``
        slots (values, indices [B, row_cap]), with the band around each threshold when ``band``."""
        m = self.config
        W_enc, b_enc, _ = self._weights()
        return self.kernels.threshold_encode(x_c.astype(self.compute_dtype), W_enc, b_enc, self.threshold[...],
                                             m.row_cap, band=m.jumprelu_bandwidth if band else None)

    def threshold_surrogate(self, code: Any, g_recon: jax.Array) -> jax.Array:
        """A term of value 0 whose gradient w.r.t. the thresholds is their rectangle-kernel
        pseudo-gradient (``TorchSAE._threshold_grad``): over the band entries (b, i),
        -(1/eps) (theta_i dL/dv_bi + l0_coef / B), dL/dv_bi = g_recon[b] . W_dec[i] (g_recon [B, d_out])."""
        m = self.config
        band = code.band_indices
        W_dec = jax.lax.stop_gradient(self.W_dec[...])
        _, gather_dot = jax.vjp(lambda v: self.kernels.sparse_decode(v, band, W_dec), jnp.zeros(band.shape, jnp.float32))
        (dv,) = gather_dot(jax.lax.stop_gradient(g_recon))
        theta = self.threshold[...][jnp.maximum(band, 0)]
        coeff = -(jax.lax.stop_gradient(theta) * dv + m.l0_coef / band.shape[0]) / m.jumprelu_bandwidth
        term = jnp.sum(jnp.where(band >= 0, jax.lax.stop_gradient(coeff) * theta, 0.0))
        return term - jax.lax.stop_gradient(term)

    def decode(self, values: jax.Array, indices: jax.Array, xn: jax.Array) -> jax.Array:
        """Code values/indices [B, w] (and normalised input xn [B, d_in]) -> the prediction in the
        normalised target space, fp32 [B, d_out]."""
        _, _, W_dec = self._weights()
        return self._finish(self.kernels.sparse_decode(values.astype(W_dec.dtype), indices, W_dec), xn)

    def _finish(self, decoded: jax.Array, xn: jax.Array) -> jax.Array:
        """decoded [..., B, d_out] as fp32, plus b_dec (and the skip connection of xn [B, d_in])."""
        out = decoded.astype(jnp.float32) + self.b_dec[...]
        if self.W_skip is not None:
            out = out + xn @ self.W_skip[...].T
        return out

    def prefix_predictions(self, values: jax.Array, indices: jax.Array, xn: jax.Array) -> jax.Array:
        """The prediction of every Matryoshka prefix from a code [B, w], in the normalised target
        space (one ``prefix_decode`` pass). -> fp32 [G, B, d_out]."""
        _, _, W_dec = self._weights()
        parts = self.kernels.prefix_decode(values.astype(W_dec.dtype), indices, W_dec, tuple(self.config.prefixes))
        return self._finish(parts, xn)

    def reconstruction_loss(self, values: jax.Array, indices: jax.Array, xn: jax.Array, yn: jax.Array,
                            total_variance: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The main reconstruction term of a code [B, w]: (its loss, the FVU of the whole
        prediction, that prediction's error [B, d_out]); Matryoshka: the weighted FVUs of every prefix."""
        if not self.config.is_matryoshka:
            error = self.decode(values, indices, xn) - yn
            fvu = jnp.sum(error**2) / total_variance
            return fvu, fvu, error
        errors = self.prefix_predictions(values, indices, xn) - yn
        fvus = [jnp.sum(e**2) / total_variance for e in errors]
        loss = sum(w * f for w, f in zip(matryoshka_loss_weights(self.config), fvus))
        return loss, fvus[-1], errors[-1]

    def loss(self, xn: jax.Array, yn: jax.Array, aux_active: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Training loss on normalised xn [B, d_in], yn [B, d_out]: FVU (+ MULTI_TOPK_WEIGHT * Multi-TopK)
        (+ aux_coef * AuxK). -> (loss, {fvu, aux_loss, the main code values/indices [B, k],
        code_indices: every latent of any code this step, [B, *]})."""
        m = self.config
        code = None
        if m.kind == "jumprelu":
            x_c = xn if m.is_transcoder else xn - self.b_dec[...]
            code = self.threshold_code(x_c, band=True)
            values, indices = code.values, code.indices
        else:
            values, indices, x_c = self.encode(xn, training=True)
        main_v, main_i = (values[:, : m.k], indices[:, : m.k]) if m.multi_topk else (values, indices)
        total_variance = jnp.sum((yn - yn.mean(axis=0)) ** 2)
        loss, fvu, error = self.reconstruction_loss(main_v, main_i, xn, yn, total_variance)
        overflow = jnp.zeros((), jnp.float32)
        if code is not None:  # JumpReLU: the L0 penalty (exact counts) and the thresholds' pseudo-gradient
            loss = loss + m.l0_coef * jnp.mean(code.counts.astype(jnp.float32))
            loss = loss + self.threshold_surrogate(code, error * (2 / total_variance))
            overflow = jnp.mean(code.overflow.astype(jnp.float32))
        if m.multi_topk:
            loss = loss + jnp.sum((self.decode(values, indices, xn) - yn) ** 2) / total_variance * MULTI_TOPK_WEIGHT
        aux_loss = jnp.zeros((), jnp.float32)
        code_indices = indices
        if aux_active and m.aux_coef > 0:
            W_enc, b_enc, W_dec = self._weights()
            dead = self.since_fired[: m.n_latents] > m.dead_tokens
            aux_v, aux_i = self.kernels.topk_encode(
                x_c.astype(self.compute_dtype), W_enc, b_enc, m.aux_k, latent_mask=self.selectable(dead)
            )
            aux_recon = self.kernels.sparse_decode(aux_v, aux_i, W_dec).astype(jnp.float32)
            residual = jax.lax.stop_gradient(error)
            residual_variance = jnp.maximum(jnp.sum((residual - residual.mean(axis=0)) ** 2), AUX_VARIANCE_FLOOR)
            # Zero when no latent is dead, as in the PyTorch backend, which then skips the pass.
            aux_loss = jnp.any(dead) * jnp.sum((aux_recon - residual) ** 2) / residual_variance
            loss = loss + m.aux_coef * aux_loss
            code_indices = jnp.concatenate([indices, aux_i], axis=1)
        aux = {"fvu": fvu, "aux_loss": aux_loss, "values": main_v, "indices": main_i, "code_indices": code_indices,
               "overflow": overflow}
        return loss, aux

    # -- the unit-norm decoder and the statistics ----------------------------------------------

    def project_decoder_grad(self, g: jax.Array) -> jax.Array:
        """Remove from each row of the W_dec gradient g [rows, d_out] its component along the row."""
        W_dec = self.W_dec[...]
        return g - jnp.sum(g * W_dec, axis=1, keepdims=True) * W_dec

    def renormalize_decoder(self, touched: jax.Array | None) -> None:
        """Scale W_dec's rows back to unit norm: all of them, or those where touched [rows] is True."""
        W_dec = self.W_dec[...]
        normalized = _normalize_rows(W_dec)
        self.W_dec[...] = normalized if touched is None else jnp.where(touched[:, None], normalized, W_dec)

    def track_firing(self, values: jax.Array, indices: jax.Array, batch: int) -> None:
        """Count the latents with a positive value in code values/indices [B, k] as fired."""
        n = self.config.n_latents
        fired = jnp.where((values > 0) & (indices >= 0), indices, n).reshape(-1)
        self.since_fired[...] = (self.since_fired[...] + batch).at[fired].set(0)
        self.fire_count[...] = self.fire_count[...].at[fired].add(1)


def row_sparse_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam`` that updates only touched rows of W_enc, b_enc and W_dec.

    ``update(grads, state, params, touched=...)`` with touched [n] bool: the rows of those
    parameters where it is False get a zero update and keep their moments (``optim.Adam``'s
    ``step_rows``); every other entry, and the step count, move as in dense Adam. The state is
    a ``ScaleByAdamState``, so checkpoints do not depend on the mode.
    """
    adam = optax.scale_by_adam(b1, b2, eps)

    def update_fn(
        updates: Params, state: optax.ScaleByAdamState, params: Params | None = None, *, touched: jax.Array,
        **extra_args: Any,
    ) -> tuple[Params, optax.ScaleByAdamState]:
        del extra_args
        new_updates, new_state = adam.update(updates, state, params)

        def keep(new: Params, old: Params) -> Params:
            return {name: jnp.where(_row_mask(touched, x.ndim), x, old[name]) if name in ROW_PARAMS else x
                    for name, x in new.items()}

        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        return keep(new_updates, zeros), new_state._replace(mu=keep(new_state.mu, state.mu),
                                                           nu=keep(new_state.nu, state.nu))

    return optax.GradientTransformationExtraArgs(adam.init, update_fn)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """Global-norm clipping (if set), then Adam, dense or row-sparse; the step scales by -lr."""
    scale_by_adam = row_sparse_adam if t.optimizer == "row_sparse_adam" else optax.scale_by_adam
    adam = scale_by_adam(t.adam_b1, t.adam_b2, t.adam_eps)
    clip = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip is not None else []
    return optax.chain(*clip, adam)


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _train_step(
    graphdef: nnx.GraphDef, train: TrainConfig, state: nnx.State, opt_state: optax.OptState, x: jax.Array,
    y: jax.Array, lr: jax.Array, aux_active: bool,
) -> tuple[nnx.State, optax.OptState, dict[str, jax.Array]]:
    """The compiled training step of a model (``graphdef`` and its ``state``) and optimizer
    (``make_optimizer(train)`` and its state) on a batch x [B, d_in], y [B, d_out]. ->
    (the new state, the new optimizer state, metrics). The static arguments hash by value, so
    backends with equal configs share one compilation."""
    tx = make_optimizer(train)
    model = nnx.merge(graphdef, state)
    xn, yn = model.normalize(x, model.in_scale), model.normalize(y, model.out_scale)
    # Gradients w.r.t. the Params; the BatchTopK threshold the forward moves is kept too.
    grad_fn = nnx.value_and_grad(lambda mod: mod.loss(xn, yn, aux_active), argnums=nnx.DiffState(0, nnx.Param),
                                 has_aux=True)
    (loss, aux), grads = grad_fn(model)
    grads = nnx.to_pure_dict(grads)
    # Projection before clipping, so the clipped norm is that of the gradient Adam sees.
    grads["W_dec"] = model.project_decoder_grad(grads["W_dec"])
    params = model.params()
    touched = None
    if train.optimizer == "row_sparse_adam":
        # Rows that received gradient: every latent of any code in this step (main, Multi-TopK, AuxK).
        rows, code = model.rows, aux["code_indices"]
        touched = jnp.zeros(rows + 1, bool).at[jnp.where(code >= 0, code, rows)].set(True)[:rows]
        updates, opt_state = tx.update(grads, opt_state, params, touched=touched)
    else:
        updates, opt_state = tx.update(grads, opt_state, params)
    model.set_params(optax.apply_updates(params, optax.tree.scale(-lr, updates)))
    model.renormalize_decoder(touched)
    if model.threshold is not None:  # JumpReLU thresholds stay >= 0, as in the PyTorch backend
        model.threshold[...] = jnp.maximum(model.threshold[...], 0.0)
    model.track_firing(aux["values"], aux["indices"], x.shape[0])
    l0 = jnp.mean(jnp.sum(aux["values"] > 0, axis=1).astype(jnp.float32))
    metrics = {"loss": loss, "fvu": aux["fvu"], "aux_loss": aux["aux_loss"], "l0": l0, "overflow": aux["overflow"]}
    return nnx.state(model), opt_state, metrics


@functools.cache
def _hashable(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__hash__": lambda self: hash(dataclasses.astuple(self))})


def _static(config: Any) -> Any:
    """A copy of a config dataclass that hashes by value (static data of compiled functions;
    list fields become tuples)."""
    fields = {key: tuple(value) if isinstance(value, list) else value
              for key, value in dataclasses.asdict(config).items()}
    return _hashable(type(config))(**fields)


def _device_precision(requested: str) -> str:
    """``resolve_precision`` for JAX's default device (a GPU's capability as JAX reports it)."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        major, minor = str(device.compute_capability).split(".")
        return resolve_precision(requested, "cuda", cuda_capability=(int(major), int(minor))).dtype
    return resolve_precision(requested, device.platform).dtype


class Layout(Protocol):
    """Where a ``JaxSAE``'s arrays live and what computes its codes.

    ``kernels``: an object with ``sae_kernels.jax``'s ``topk_encode`` and ``sparse_decode``.
    """

    kernels: Any

    def rows(self, n: int) -> int:
        """Rows of the per-latent arrays for n latents (n, or n padded to split evenly)."""
        ...

    def place_state(self, tree: Any, batch: jax.Array) -> Any:
        """The backend's (model state, optimizer state) placed for training on ``batch``."""
        ...

    def place_batch(self, x: jax.Array) -> jax.Array:
        """An input [B, ...] placed where the kernels read it."""
        ...


class OneDevice:
    """The default layout: ``sae_kernels.jax``, the state replicated over the batch's devices."""

    kernels = kernels

    def rows(self, n: int) -> int:
        return n

    def place_state(self, tree: Any, batch: jax.Array) -> Any:
        # As the step returns it: arrays made fresh (initialisation, loading, reset counters)
        # would otherwise compile the step once more.
        sharding = batch.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(tree, sharding)

    def place_batch(self, x: jax.Array) -> jax.Array:
        return x


class JaxSAE:
    """TopK / BatchTopK SAE or transcoder trained with JAX (``SAEBackend``, ``ArrayBackend`` and
    ``SAEAnalysis`` of ``sae_engine.training.backend``), on JAX's default device or as a ``Layout``
    places it. ``config.model`` is the model's configuration, ``module`` the model itself."""

    def __init__(self, config: RunConfig, precision: str | None = None, layout: Layout | None = None) -> None:
        """``precision``: the compute dtype, "bf16" or "fp32"; None = ``config.train.precision``
        decided for JAX's default device (``sae_engine.training.precision``). ``layout``: ``OneDevice()``
        by default."""
        self.config = config
        self.precision = precision or _device_precision(config.train.precision)
        self.layout = layout or OneDevice()
        compute_dtype = jnp.bfloat16 if self.precision == "bf16" else jnp.float32
        self.rows = self.layout.rows(config.model.n_latents)
        module = SparseAutoencoder(_static(config.model), config.train.seed, compute_dtype, self.layout.kernels,
                                   self.rows)
        # Held split, so a step passes the state to the compiled function without walking the module.
        self.graphdef, self.state = nnx.split(module)
        self._train = _static(config.train)
        self.opt_state = make_optimizer(self._train).init(module.params())
        self.aux_active = False  # see TorchSAE.aux_active
        self._placed_for: jax.sharding.Sharding | None = None  # the batch sharding the state was placed for

    @property
    def module(self) -> SparseAutoencoder:
        """The model as an nnx module, merged from ``state``; ``_store`` writes changes back."""
        return nnx.merge(self.graphdef, self.state)

    def _store(self, module: SparseAutoencoder) -> None:
        # Whether merge shares Variables with the state it came from is Flax's detail: re-split.
        self.state = nnx.state(module)
        self._placed_for = None

    @property
    def params(self) -> Params:
        """The parameters by name, as JAX arrays."""
        return nnx.to_pure_dict(nnx.filter_state(self.state, nnx.Param))

    @property
    def buffers(self) -> Params:
        """Latent statistics and normalisation scales by name (the checkpoint's buffers)."""
        return nnx.to_pure_dict(nnx.filter_state(self.state, nnx.Not(nnx.Param)))

    @property
    def adam_count(self) -> int:
        """Completed optimizer steps (optax's count; reading it waits for the device)."""
        return int(optax.tree.get(self.opt_state, "count"))

    # -- initialisation ----------------------------------------------------------------------

    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Normalisation scales and b_dec from a sample, exactly as ``TorchSAE.initialize``."""
        m, module = self.config.model, self.module
        if m.normalize == "dataset":
            in_scale = mean_squared_norm_scale(x)
            out_scale = mean_squared_norm_scale(y) if m.is_transcoder else in_scale
            module.in_scale[...] = jnp.float32(torch.tensor(in_scale).item())
            module.out_scale[...] = jnp.float32(torch.tensor(out_scale).item())
        target = to_torch(module.normalize(to_jax(y.float()), module.out_scale))
        if m.b_dec_init == "geometric_median":
            module.b_dec[...] = jnp.asarray(geometric_median(target).numpy())
        elif m.b_dec_init == "mean":
            module.b_dec[...] = jnp.asarray(target.mean(dim=0).numpy())
        self._store(module)

    # -- the training step ---------------------------------------------------------------------

    def _in(self, t: torch.Tensor) -> jax.Array:
        """A torch input as a JAX array where the layout's kernels read it."""
        return self.layout.place_batch(to_jax(t))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, jax.Array]:
        """One step of forward, sparse backward and Adam. x: [B, d_in], y: [B, d_out] torch tensors."""
        xj = self._in(x)
        return self.train_step_arrays(xj, xj if y is x else self._in(y), lr)

    def train_step_arrays(self, xj: jax.Array, yj: jax.Array, lr: float) -> dict[str, jax.Array]:
        """``train_step`` on JAX arrays, which may be sharded over a mesh (a batch laid out over a mesh axis trains data-parallel)."""
        if xj.sharding != self._placed_for:
            self.state, self.opt_state = self.layout.place_state((self.state, self.opt_state), xj)
            self._placed_for = xj.sharding
        self.state, self.opt_state, metrics = _train_step(
            self.graphdef, self._train, self.state, self.opt_state, xj, yj, jnp.float32(lr), self.aux_active
        )
        return metrics

    # -- inference and statistics --------------------------------------------------------------

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """FVU and L0 on held-out data x [B, d_in], y [B, d_out] (BatchTopK by its threshold)."""
        module = self.module
        xn, yn = module.normalize(self._in(x), module.in_scale), module.normalize(self._in(y), module.out_scale)
        values, indices, _ = module.encode(xn, training=False)
        recon = module.decode(values, indices, xn)
        total_variance = jnp.sum((yn - yn.mean(axis=0)) ** 2)
        return {
            "eval_fvu": float(jnp.sum((recon - yn) ** 2) / total_variance),
            "eval_l0": float(jnp.mean(jnp.sum(values > 0, axis=1).astype(jnp.float32))),
        }

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference code of raw x [B, d_in]. -> values [B, w] fp32, indices [B, w] int64 (torch)."""
        module = self.module
        values, indices, _ = module.encode(module.normalize(self._in(x), module.in_scale), training=False)
        return to_torch(values.astype(jnp.float32)), to_torch(indices).long()

    def decode(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction from a code [B, w] of raw x [B, d_in], in the target's raw scale. -> [B, d_out] fp32."""
        m, module = self.config.model, self.module
        if m.normalize == "layernorm" and m.is_transcoder:
            raise ValueError("a transcoder with model.normalize = 'layernorm' predicts normalised targets; "
                             "their raw scale is unknown")
        xj = self._in(x).astype(jnp.float32)
        out = module.decode(self._in(values), self._in(indices.long()), module.normalize(xj, module.in_scale))
        if m.normalize == "layernorm":  # undo the per-vector normalisation with x's own statistics
            out = out * jnp.sqrt(xj.var(axis=1, keepdims=True) + LAYER_NORM_EPS) + xj.mean(axis=1, keepdims=True)
        else:
            out = out / module.out_scale[...]
        return to_torch(out)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """An SAE's reconstruction of raw x [B, d_in], in x's own scale. -> [B, d_in] fp32."""
        if self.config.model.is_transcoder:
            raise ValueError("a transcoder predicts another layer; reconstruct() is for SAEs (use decode())")
        return self.decode(*self.encode(x), x)

    def latent_stats(self, tokens: int) -> dict[str, float]:
        """Dead and dense fractions (host sync); resets the firing counts of the window."""
        module = self.module
        stats = latent_fractions(to_torch(module.since_fired[...]), to_torch(module.fire_count[...]), self.config.model,
                                 tokens)
        module.fire_count[...] = jnp.zeros_like(module.fire_count[...])
        self._store(module)
        self.aux_active = stats["dead_fraction"] > 0
        return stats

    # -- checkpoints ---------------------------------------------------------------------------

    def state_arrays(self) -> dict[str, jax.Array]:
        """The state as JAX arrays under checkpoint names, as placed (per-latent ones with their
        ``rows``, counters int32); ``state_tensors`` is their torch form with n rows."""
        out = {f"param.{name}": p for name, p in self.params.items()}
        out.update({f"buffer.{name}": b for name, b in self.buffers.items()})
        for moment, field in (("m", "mu"), ("v", "nu")):  # ScaleByAdamState.mu and .nu
            out.update({f"adam.{moment}.{name}": t for name, t in optax.tree.get(self.opt_state, field).items()})
        return out

    def load_state_arrays(self, arrays: dict[str, jax.Array], adam_count: int, aux_active: bool) -> None:
        """Restore from ``state_arrays``' names and shapes (per-latent ones with ``rows`` rows)."""
        names = list(self.params)
        values = {name: arrays[f"param.{name}"] for name in names}
        values.update({name: arrays[f"buffer.{name}"] for name in self.buffers})
        nnx.replace_by_pure_dict(self.state, values)
        self.opt_state = optax.tree.set(
            self.opt_state,
            count=jnp.asarray(adam_count, jnp.int32),
            mu={name: arrays[f"adam.m.{name}"] for name in names},
            nu={name: arrays[f"adam.v.{name}"] for name in names},
        )
        self._placed_for = None
        self.aux_active = aux_active

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors with the PyTorch backend's names, dtypes and shapes."""
        n = self.config.model.n_latents
        out = {}
        for key, a in self.state_arrays().items():
            t = to_torch(a)
            if is_row_param(key):
                t = t[:n]
            out[key] = t.long() if key in STATISTICS else t
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_count: int, aux_active: bool) -> None:
        """Restore from ``state_tensors`` (of either backend) and the optimizer's step count."""
        def j(key: str) -> jax.Array:
            # jnp.array copies: the torch tensors may be live parameters updated in place.
            t = tensors[key]
            if key in STATISTICS:
                return jnp.array(t.clamp_max(INT32_MAX).numpy(), dtype=jnp.int32)
            a = jnp.array(t.numpy(), dtype=jnp.float32)
            return pad_to_rows(a, self.rows) if is_row_param(key) else a

        self.load_state_arrays({key: j(key) for key in self.state_arrays()}, adam_count, aux_active)
