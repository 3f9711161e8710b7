"""The JAX backend: the same models, losses, optimizer and checkpoint tensors as the PyTorch one.

Parameters, Adam moments and latent statistics live in one pytree; the training step is a
single ``jax.jit``-compiled pure function built on ``sae_kernels.jax`` (whose custom VJPs make
the backward sparse). Tensor names and layouts equal ``TorchSAE.state_tensors``, so a run
started in one backend resumes in the other. Batches arrive as torch tensors from the ring
buffer and cross over through DLPack without a copy.

Row-sparse Adam in JAX keeps static shapes: it computes the update for every row and keeps it
only where the row received gradient this step (untouched rows keep parameters and moments),
which is the same rule as the PyTorch backend's, though not its saving in work.

Multi-device: ``shard_batch`` lays a batch out over a ``jax.sharding.Mesh`` axis ("data");
parameters stay replicated and XLA inserts the reductions, so results equal one device's.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from sae_kernels import jax as kernels

from .config import RunConfig
from .init import geometric_median, mean_squared_norm_scale

EMPTY = kernels.EMPTY


def to_jax(t: torch.Tensor) -> jax.Array:
    """A torch tensor as a JAX array, through DLPack (no copy for contiguous CPU tensors)."""
    return jax.dlpack.from_dlpack(t.detach().contiguous())


def to_torch(a: jax.Array) -> torch.Tensor:
    """A JAX array as a torch tensor (via numpy: bf16 and int64 safe)."""
    return torch.from_numpy(np.array(a))


def _layer_normalize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _normalize_rows(W: jax.Array) -> jax.Array:
    return W / jnp.maximum(jnp.linalg.norm(W, axis=1, keepdims=True), 1e-12)


class JaxSAE:
    """TopK / BatchTopK SAE or transcoder trained with JAX; the interface of ``TorchSAE``."""

    def __init__(self, config: RunConfig, device: Any = None) -> None:
        self.config = config
        m = config.model
        self.compute_dtype = jnp.float32 if config.train.precision == "fp32" else jnp.bfloat16
        # Initial weights come from the torch generator so both backends start identically.
        gen = torch.Generator().manual_seed(config.train.seed)
        n, d_in, d_out = m.n_latents, m.d_in, m.target_dim
        W_dec = torch.randn(n, d_out, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = torch.randn(n, d_in, generator=gen) / d_in**0.5 if m.is_transcoder else W_dec.clone()
        params = {"W_enc": W_enc, "b_enc": torch.zeros(n), "W_dec": W_dec, "b_dec": torch.zeros(d_out)}
        if m.skip_connection:
            params["W_skip"] = torch.zeros(d_out, d_in)
        self.params = {name: jnp.asarray(p.numpy()) for name, p in params.items()}
        self.m = jax.tree.map(jnp.zeros_like, self.params)
        self.v = jax.tree.map(jnp.zeros_like, self.params)
        self.buffers = {
            "since_fired": jnp.zeros(n + 1, jnp.int32),
            "fire_count": jnp.zeros(n + 1, jnp.int32),
            "in_scale": jnp.ones((), jnp.float32),
            "out_scale": jnp.ones((), jnp.float32),
            "batchtopk_threshold": jnp.zeros((), jnp.float32),
        }
        self.count = 0
        self.aux_active = False  # see TorchSAE.aux_active

    @property
    def adam_count(self) -> int:
        return self.count

    # -- initialisation ----------------------------------------------------------------------

    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Normalisation scales and b_dec from a sample, exactly as ``TorchSAE.initialize``."""
        m = self.config.model
        if m.normalize == "dataset":
            in_scale = mean_squared_norm_scale(x)
            out_scale = mean_squared_norm_scale(y) if m.is_transcoder else in_scale
            self.buffers["in_scale"] = jnp.float32(torch.tensor(in_scale).item())
            self.buffers["out_scale"] = jnp.float32(torch.tensor(out_scale).item())
        target = to_torch(self._norm(to_jax(y.float()), "out_scale"))
        if m.b_dec_init == "geometric_median":
            self.params["b_dec"] = jnp.asarray(geometric_median(target).numpy())
        elif m.b_dec_init == "mean":
            self.params["b_dec"] = jnp.asarray(target.mean(dim=0).numpy())

    def _norm(self, x: jax.Array, scale_name: str, buffers: dict | None = None) -> jax.Array:
        if self.config.model.normalize == "layernorm":
            return _layer_normalize(x)
        return x.astype(jnp.float32) * (buffers or self.buffers)[scale_name]

    # -- the model as pure functions -----------------------------------------------------------

    def _code(self, params, buffers, xn, training: bool):
        """Sparse code of normalised input. -> values [B, k'], indices [B, k'], encoder input."""
        m = self.config.model
        cd = self.compute_dtype
        x_c = xn if m.is_transcoder else xn - params["b_dec"]
        k_code = m.row_cap if m.kind == "batchtopk" else (4 * m.k if m.multi_topk else m.k)
        values, indices = kernels.topk_encode(
            x_c.astype(cd), params["W_enc"].astype(cd), params["b_enc"].astype(cd), min(k_code, m.n_latents)
        )
        threshold = buffers["batchtopk_threshold"]
        if m.kind == "batchtopk":
            flat = values.astype(jnp.float32).reshape(-1)
            budget = min(xn.shape[0] * m.k, flat.shape[0])
            if training:
                cutoff = jax.lax.top_k(flat, budget)[0][-1]
                keep = values.astype(jnp.float32) >= cutoff
                smallest = jnp.min(jnp.where(keep & (values > 0), values.astype(jnp.float32), jnp.inf))
                threshold = threshold + 0.01 * (jnp.where(jnp.isfinite(smallest), smallest, threshold) - threshold)
            else:
                keep = values.astype(jnp.float32) >= threshold
            values = values * keep
            indices = jnp.where(keep, indices, EMPTY)
        return values, indices, x_c, threshold

    def _decode(self, params, values, indices, xn):
        out = kernels.sparse_decode(values, indices, params["W_dec"].astype(self.compute_dtype)).astype(jnp.float32)
        out = out + params["b_dec"]
        if "W_skip" in params:
            out = out + xn @ params["W_skip"].T
        return out

    def _loss(self, params, buffers, xn, yn, aux_active: bool):
        m = self.config.model
        values, indices, x_c, threshold = self._code(params, buffers, xn, training=True)
        main_v, main_i = (values[:, : m.k], indices[:, : m.k]) if m.multi_topk else (values, indices)
        error = self._decode(params, main_v, main_i, xn) - yn
        total_variance = jnp.sum((yn - yn.mean(axis=0)) ** 2)
        fvu = jnp.sum(error**2) / total_variance
        loss = fvu
        if m.multi_topk:
            loss = loss + jnp.sum((self._decode(params, values, indices, xn) - yn) ** 2) / total_variance / 8
        aux_loss = jnp.zeros((), jnp.float32)
        if aux_active and m.aux_coef > 0:
            cd = self.compute_dtype
            dead = buffers["since_fired"][: m.n_latents] > m.dead_tokens
            aux_v, aux_i = kernels.topk_encode(
                x_c.astype(cd), params["W_enc"].astype(cd), params["b_enc"].astype(cd), m.aux_k, latent_mask=dead
            )
            aux_recon = kernels.sparse_decode(aux_v, aux_i, params["W_dec"].astype(cd)).astype(jnp.float32)
            residual = jax.lax.stop_gradient(error)
            residual_variance = jnp.maximum(jnp.sum((residual - residual.mean(axis=0)) ** 2), 1e-12)
            # Zero when no latent is dead, as in the PyTorch backend, which then skips the pass.
            aux_loss = jnp.any(dead) * jnp.sum((aux_recon - residual) ** 2) / residual_variance
            loss = loss + m.aux_coef * aux_loss
            code_indices = jnp.concatenate([indices, aux_i], axis=1)
        else:
            code_indices = indices
        aux = {"fvu": fvu, "aux_loss": aux_loss, "values": main_v, "indices": main_i, "threshold": threshold,
               "code_indices": code_indices}
        return loss, aux

    @functools.partial(jax.jit, static_argnums=(0, 8))
    def _step(self, params, m_state, v_state, buffers, x, y, step_size, aux_active: bool, root_correction):
        mc, t = self.config.model, self.config.train
        xn, yn = self._norm(x, "in_scale", buffers), self._norm(y, "out_scale", buffers)
        (loss, aux), grads = jax.value_and_grad(self._loss, has_aux=True)(params, buffers, xn, yn, aux_active)
        # Unit-norm decoder: remove each row's gradient component along the row.
        W_dec = params["W_dec"]
        grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * W_dec, axis=1, keepdims=True) * W_dec
        if t.grad_clip is not None:
            norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
            factor = jnp.where(norm > t.grad_clip, t.grad_clip / norm, 1.0)
            grads = jax.tree.map(lambda g: g * factor, grads)
        # Rows that received gradient: every latent of any code in this step (main, Multi-TopK, AuxK).
        n = mc.n_latents
        code = aux["code_indices"]
        touched = jnp.zeros(n + 1, bool).at[jnp.where(code >= 0, code, n)].set(True)[:n]
        b1, b2, eps = t.adam_b1, t.adam_b2, t.adam_eps
        new_params, new_m, new_v = {}, {}, {}
        for name, p in params.items():
            g = grads[name]
            m_new = m_state[name] + (1 - b1) * (g - m_state[name])
            v_new = b2 * v_state[name] + (1 - b2) * g * g
            p_new = p - step_size * m_new / (jnp.sqrt(v_new) / root_correction + eps)
            if t.optimizer == "row_sparse_adam" and name in ("W_enc", "b_enc", "W_dec"):
                keep = touched.reshape((-1,) + (1,) * (p.ndim - 1))
                m_new, v_new, p_new = (jnp.where(keep, a, b) for a, b in ((m_new, m_state[name]), (v_new, v_state[name]), (p_new, p)))
            new_params[name], new_m[name], new_v[name] = p_new, m_new, v_new
        normalized = _normalize_rows(new_params["W_dec"])
        if t.optimizer == "row_sparse_adam":
            normalized = jnp.where(touched[:, None], normalized, new_params["W_dec"])
        new_params["W_dec"] = normalized
        fired = jnp.where((aux["values"] > 0) & (aux["indices"] >= 0), aux["indices"], n).reshape(-1)
        batch = x.shape[0]
        new_buffers = dict(buffers)
        new_buffers["since_fired"] = (buffers["since_fired"] + batch).at[fired].set(0)
        new_buffers["fire_count"] = buffers["fire_count"].at[fired].add(1)
        new_buffers["batchtopk_threshold"] = aux["threshold"]
        l0 = jnp.mean(jnp.sum(aux["values"] > 0, axis=1).astype(jnp.float32))
        metrics = {"loss": loss, "fvu": aux["fvu"], "aux_loss": aux["aux_loss"], "l0": l0}
        return new_params, new_m, new_v, new_buffers, metrics

    # -- the backend interface -----------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, jax.Array]:
        """One step of forward, sparse backward and Adam. x: [B, d_in], y: [B, d_out] torch tensors."""
        xj = to_jax(x)
        return self.train_step_arrays(xj, xj if y is x else to_jax(y), lr)

    def train_step_arrays(self, xj: jax.Array, yj: jax.Array, lr: float) -> dict[str, jax.Array]:
        """``train_step`` on JAX arrays, which may be sharded over a mesh (see ``shard_batch``)."""
        self.count += 1
        t = self.config.train
        # Bias corrections in float64 on the host, as the PyTorch backend computes them.
        step_size = lr / (1 - t.adam_b1**self.count)
        root_correction = (1 - t.adam_b2**self.count) ** 0.5
        self.params, self.m, self.v, self.buffers, metrics = self._step(
            self.params, self.m, self.v, self.buffers, xj, yj, jnp.float32(step_size), self.aux_active,
            jnp.float32(root_correction),
        )
        return metrics

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        m = self.config.model
        xn, yn = self._norm(to_jax(x), "in_scale"), self._norm(to_jax(y), "out_scale")
        values, indices, _, _ = self._code(self.params, self.buffers, xn, training=False)
        if m.multi_topk and m.kind == "topk":
            values, indices = values[:, : m.k], indices[:, : m.k]
        recon = self._decode(self.params, values, indices, xn)
        total_variance = jnp.sum((yn - yn.mean(axis=0)) ** 2)
        return {
            "eval_fvu": float(jnp.sum((recon - yn) ** 2) / total_variance),
            "eval_l0": float(jnp.mean(jnp.sum(values > 0, axis=1).astype(jnp.float32))),
        }

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code of raw activations x [B, d_in]. -> values, indices (torch, int64)."""
        xn = self._norm(to_jax(x), "in_scale")
        values, indices, _, _ = self._code(self.params, self.buffers, xn, training=False)
        return to_torch(values.astype(jnp.float32)), to_torch(indices).long()

    def latent_stats(self, tokens: int) -> dict[str, float]:
        m = self.config.model
        dead = float(jnp.mean((self.buffers["since_fired"][: m.n_latents] > m.dead_tokens).astype(jnp.float32)))
        frequency = self.buffers["fire_count"][: m.n_latents].astype(jnp.float32) / max(tokens, 1)
        dense = float(jnp.mean((frequency > 0.1).astype(jnp.float32)))
        self.buffers["fire_count"] = jnp.zeros_like(self.buffers["fire_count"])
        self.aux_active = dead > 0
        return {"dead_fraction": dead, "dense_fraction": dense}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensors with the PyTorch backend's names, dtypes and shapes."""
        out = {f"param.{name}": to_torch(p) for name, p in self.params.items()}
        for name, b in self.buffers.items():
            t = to_torch(b)
            out[f"buffer.{name}"] = t.long() if name in ("since_fired", "fire_count") else t
        out.update({f"adam.m.{name}": to_torch(t) for name, t in self.m.items()})
        out.update({f"adam.v.{name}": to_torch(t) for name, t in self.v.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_count: int, aux_active: bool) -> None:
        def j(name: str, dtype=jnp.float32) -> jax.Array:
            # jnp.array copies: the torch tensors may be live parameters updated in place.
            return jnp.array(tensors[name].numpy(), dtype=dtype)

        self.params = {name: j(f"param.{name}") for name in self.params}
        self.m = {name: j(f"adam.m.{name}") for name in self.params}
        self.v = {name: j(f"adam.v.{name}") for name in self.params}
        for name in self.buffers:
            counter = name in ("since_fired", "fire_count")
            # Counters saturate rather than wrap in int32.
            value = tensors[f"buffer.{name}"].clamp_max(2**31 - 1) if counter else tensors[f"buffer.{name}"]
            self.buffers[name] = jnp.array(value.numpy(), dtype=jnp.int32 if counter else jnp.float32)
        self.count = adam_count
        self.aux_active = aux_active


def shard_batch(batch: jax.Array, mesh: jax.sharding.Mesh, axis: str = "data") -> jax.Array:
    """Lay a batch's rows out over a mesh axis (data parallelism)."""
    spec = jax.sharding.PartitionSpec(axis, None)
    return jax.device_put(batch, jax.sharding.NamedSharding(mesh, spec))
