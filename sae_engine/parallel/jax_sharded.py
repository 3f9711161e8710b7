"""The exact sharded top-k and decoder on a ``jax.sharding.Mesh`` (axes "data", "latent").

The same algorithm as ``selection`` for torch, written with ``shard_map``: each device of the
``latent`` axis holds ceil(n / L) rows (n padded with never-eligible rows, as DTensor's row
split), selects its top k with ``sae_kernels.jax.topk_encode``, the (pre-activation, global
index) candidates are gathered with ``lax.all_gather`` and sorted by (key descending, index
ascending) in one ``lax.sort``; each device decodes its own winners and ``lax.psum`` adds the
parts. Rows of x are split over ``data`` (when their count divides evenly; otherwise every data
group computes all of them). Both are differentiable: gradients flow through the kernels' custom
VJPs on each device, and ``shard_map``'s transposes sum them over the mesh.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sae_kernels import jax as kj

EMPTY = kj.EMPTY


def make_mesh(data: int, latent: int, devices=None) -> Mesh:
    """A (data, latent) mesh over the first data * latent devices."""
    devices = np.asarray((devices or jax.devices())[: data * latent]).reshape(data, latent)
    return Mesh(devices, ("data", "latent"))


def rows_spec(rows: int, mesh: Mesh) -> P:
    """How a batch of ``rows`` rows enters shard_map: split over ``data`` where it divides."""
    return P("data") if rows % mesh.shape["data"] == 0 else P()


def pad_rows(a: jax.Array, parts: int, fill) -> jax.Array:
    """Rows padded to a multiple of ``parts`` (the padding is never selected)."""
    extra = -a.shape[0] % parts
    return jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], fill, a.dtype)]) if extra else a


def _local_candidates(x, W, b, mask, k):
    """One device's candidates: (keys [B, k] fp32, global indices [B, k] int32)."""
    rows = W.shape[0]
    offset = lax.axis_index("latent") * rows
    local_k = min(k, rows)
    values, local = kj.topk_encode(x, W, b, local_k, latent_mask=mask)
    found = local >= 0
    safe = jnp.maximum(local, 0)
    # Candidates at or below zero: recompute the pre-activation for the order (see selection).
    pre = jnp.einsum("bd,bkd->bk", x.astype(jnp.float32), W[safe].astype(jnp.float32),
                     precision=lax.Precision.HIGHEST) + b[safe].astype(jnp.float32)
    keys = jnp.where(values > 0, values.astype(jnp.float32), jnp.minimum(pre, 0.0))
    keys = jnp.where(found, keys, -jnp.inf)
    indices = jnp.where(found, local + offset, EMPTY).astype(jnp.int32)
    if local_k < k:
        keys = jnp.pad(keys, ((0, 0), (0, k - local_k)), constant_values=-jnp.inf)
        indices = jnp.pad(indices, ((0, 0), (0, k - local_k)), constant_values=EMPTY)
    return keys, indices


def merge_candidates(keys: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of candidate sets [B, C]: keys descending, ties by smaller index, empty slots last."""
    order_index = jnp.where(indices >= 0, indices, jnp.iinfo(jnp.int32).max)
    neg_keys, _, chosen = lax.sort((-keys, order_index, indices), dimension=1, num_keys=2)
    top, chosen = -neg_keys[:, :k], chosen[:, :k]
    empty = top == -jnp.inf
    return jnp.where(empty, 0.0, jnp.maximum(top, 0.0)), jnp.where(empty, EMPTY, chosen)


@partial(jax.jit, static_argnames=("k", "mesh"))
def sharded_topk(x, W_enc, b_enc, k: int, mesh: Mesh, latent_mask=None):
    """``topk_encode`` of x [B, d] over W_enc [n, d] split on ``latent``. -> (values [B, k] in
    x's dtype, indices [B, k] int32), equal to one device's ``sae_kernels.jax.topk_encode``."""
    L = mesh.shape["latent"]
    n = W_enc.shape[0]
    mask = jnp.ones(n, bool) if latent_mask is None else latent_mask.astype(bool)
    W, b, mask = pad_rows(W_enc, L, 0), pad_rows(b_enc, L, 0), pad_rows(mask, L, False)

    def body(x, W, b, mask):
        keys, indices = _local_candidates(x, W, b, mask, k)
        keys = lax.all_gather(keys, "latent", axis=1, tiled=True)
        indices = lax.all_gather(indices, "latent", axis=1, tiled=True)
        values, chosen = merge_candidates(keys, indices, k)
        return values.astype(x.dtype), chosen

    rows = rows_spec(x.shape[0], mesh)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, P("latent"), P("latent"), P("latent")),
                         out_specs=(rows, rows), check_vma=False)(x, W, b, mask)


@partial(jax.jit, static_argnames=("mesh",))
def sharded_decode(values, indices, W_dec, mesh: Mesh):
    """``sparse_decode`` of a code with global indices [B, k] over W_dec [n, d] split on ``latent``."""
    W = pad_rows(W_dec, mesh.shape["latent"], 0)

    def body(values, indices, W):
        rows = W.shape[0]
        lo = lax.axis_index("latent") * rows
        mine = (indices >= lo) & (indices < lo + rows)
        part = kj.sparse_decode(values, jnp.where(mine, indices - lo, EMPTY), W).astype(jnp.float32)
        return lax.psum(part, "latent")

    rows = rows_spec(values.shape[0], mesh)
    return jax.shard_map(body, mesh=mesh, in_specs=(rows, rows, P("latent")), out_specs=rows,
                         check_vma=False)(values, indices, W)
