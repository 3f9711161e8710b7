"""The exact sharded top-k and decoder on a ``jax.sharding.Mesh`` (axes "data", "latent").

The same algorithm as ``selection`` for torch, written with ``shard_map``: each device of the
``latent`` axis holds ceil(n / L) rows (n padded with never-eligible rows, as DTensor's row
split), selects its top k with ``sae_kernels.jax.topk_encode``, the (pre-activation, global
index) candidates are gathered with ``lax.all_gather`` and sorted by (key descending, index
ascending) in one ``lax.sort``; each device decodes its own winners and ``lax.psum`` adds the
parts. Rows of x are split over ``data`` (when their count divides evenly; otherwise every data
group computes all of them). The Matryoshka prefix decode is the decoder's: each device decodes
its part of every prefix with ``sae_kernels.jax.prefix_decode`` at its own (static) boundaries,
picked by its latent rank, and ``lax.psum`` adds the parts. All are differentiable: gradients
flow through the kernels' custom VJPs on each device and ``shard_map``'s transposes sum them over
the mesh, except W's over ``data``, which ``spread_over_data`` sums by touched rows where that
sends fewer bytes.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from sae_kernels import jax as kj

from ..training.backend import local_prefixes

EMPTY = kj.EMPTY


def make_mesh(data: int, latent: int, devices=None) -> Mesh:
    """A (data, latent) mesh over the first data * latent devices."""
    devices = np.asarray((devices or jax.devices())[: data * latent]).reshape(data, latent)
    return Mesh(devices, ("data", "latent"))


def batch_spec(batch: int, mesh: Mesh) -> P:
    """How a batch of ``batch`` rows enters shard_map: split over ``data`` where it divides."""
    return P("data") if batch % mesh.shape["data"] == 0 else P()


def pad_to_multiple(a: jax.Array, parts: int, fill) -> jax.Array:
    """a [m, ...] with rows of ``fill`` appended up to the next multiple of ``parts`` rows (the
    padding is never selected)."""
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


def _touched_rows_pay(mesh: Mesh, rows: int, width: int, touched: int) -> bool:
    """Whether gathering ``touched`` rows per device over ``data`` sends fewer bytes than the
    dense all-reduce of a device's ``rows`` x ``width`` gradient (ring volumes, fp32, int32 ids)."""
    D = mesh.shape["data"]
    local_rows = rows // mesh.shape["latent"]
    return D > 1 and (D - 1) * touched * (width + 1) * 4 < 2 * (D - 1) / D * local_rows * width * 4


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spread_over_data(W: jax.Array, mesh: Mesh, touched: int) -> jax.Array:
    """W [rows, w] (split on ``latent``) as [D, rows, w], one block per device of ``data``.

    The kernels read W through this view, so each device's gradient comes back as its own
    block instead of being summed densely over ``data``; the backward then sums only the rows
    each device touched (at most ``touched``): one all-gather of their ids and values.
    """
    D = mesh.shape["data"]
    return lax.with_sharding_constraint(jnp.broadcast_to(W[None], (D,) + W.shape),
                                        jax.sharding.NamedSharding(mesh, P("data", "latent")))


def _spread_fwd(W, mesh, touched):
    return spread_over_data(W, mesh, touched), None


def _spread_bwd(mesh, touched, _, g):
    def body(g):
        g = g[0]
        rows = g.shape[0]
        ids = jnp.nonzero(jnp.any(g != 0, axis=1), size=touched, fill_value=rows)[0]
        values = jnp.take(g, ids, axis=0, mode="fill", fill_value=0)
        ids = lax.all_gather(ids, "data", tiled=True)
        values = lax.all_gather(values, "data", axis=0, tiled=True)
        return (jnp.zeros_like(g).at[ids].add(values, mode="drop"),)

    return jax.shard_map(body, mesh=mesh, in_specs=(P("data", "latent"),), out_specs=(P("latent"),),
                         check_vma=False)(g)


spread_over_data.defvjp(_spread_fwd, _spread_bwd)


def _weights_in(W: jax.Array, mesh: Mesh, batch_per_device: int, k: int):
    """W as the kernels' shard_map reads it, with its in_spec: spread over ``data`` where summing
    touched rows pays (each device touches at most batch_per_device * k rows), else as it is."""
    touched = batch_per_device * min(k, W.shape[0] // mesh.shape["latent"])
    if _touched_rows_pay(mesh, W.shape[0], W.shape[1], touched):
        return spread_over_data(W, mesh, touched), P("data", "latent"), lambda block: block[0]
    return W, P("latent"), lambda block: block


def _batch_per_device(batch: int, spec: P, mesh: Mesh) -> int:
    """Batch rows a device computes when a batch of ``batch`` rows enters as ``spec``."""
    return batch // mesh.shape["data"] if spec == P("data") else batch


@partial(jax.jit, static_argnames=("k", "mesh"))
def sharded_topk(x, W_enc, b_enc, k: int, mesh: Mesh, latent_mask=None):
    """``topk_encode`` of x [B, d] over W_enc [n, d] split on ``latent``. -> (values [B, k] in
    x's dtype, indices [B, k] int32), equal to one device's ``sae_kernels.jax.topk_encode``."""
    L = mesh.shape["latent"]
    n = W_enc.shape[0]
    mask = jnp.ones(n, bool) if latent_mask is None else latent_mask.astype(bool)
    W, b, mask = pad_to_multiple(W_enc, L, 0), pad_to_multiple(b_enc, L, 0), pad_to_multiple(mask, L, False)
    x_spec = batch_spec(x.shape[0], mesh)
    W, W_spec, block = _weights_in(W, mesh, _batch_per_device(x.shape[0], x_spec, mesh), k)

    def body(x, W, b, mask):
        W = block(W)
        keys, indices = _local_candidates(x, W, b, mask, k)
        keys = lax.all_gather(keys, "latent", axis=1, tiled=True)
        indices = lax.all_gather(indices, "latent", axis=1, tiled=True)
        values, chosen = merge_candidates(keys, indices, k)
        return values.astype(x.dtype), chosen

    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, W_spec, P("latent"), P("latent")),
                         out_specs=(x_spec, x_spec), check_vma=False)(x, W, b, mask)


@partial(jax.jit, static_argnames=("mesh",))
def sharded_decode(values, indices, W_dec, mesh: Mesh):
    """``sparse_decode`` of a code with global indices [B, k] over W_dec [n, d] split on ``latent``."""
    W = pad_to_multiple(W_dec, mesh.shape["latent"], 0)
    code_spec = batch_spec(values.shape[0], mesh)
    W, W_spec, block = _weights_in(W, mesh, _batch_per_device(values.shape[0], code_spec, mesh), values.shape[1])

    def body(values, indices, W):
        W = block(W)
        rows = W.shape[0]
        lo = lax.axis_index("latent") * rows
        mine = (indices >= lo) & (indices < lo + rows)
        part = kj.sparse_decode(values, jnp.where(mine, indices - lo, EMPTY), W).astype(jnp.float32)
        return lax.psum(part, "latent")

    return jax.shard_map(body, mesh=mesh, in_specs=(code_spec, code_spec, W_spec), out_specs=code_spec,
                         check_vma=False)(values, indices, W)


def _device_prefixes(boundaries: tuple[int, ...], lo: int, rows: int) -> tuple[tuple[int, ...], list[int]]:
    """``local_prefixes`` of the device holding rows [lo, lo + rows) (padding past n included):
    its ``prefix_decode`` boundaries, ending at ``rows``, and the map of the G prefixes onto them."""
    local, group_map = local_prefixes(list(boundaries), lo, lo + rows)
    if not local or local[-1] < rows:  # the padding rows close the last local prefix
        local = [*local, rows]
    return tuple(local), group_map


def _prefix_part(local: tuple[int, ...], group_map: list[int]):
    """One device's part of every prefix: values, local indices [B, k], W [rows, d] -> fp32 [G, B, d]."""
    def part(values, indices, W):
        parts = kj.prefix_decode(values, indices, W, local).astype(jnp.float32)
        padded = jnp.concatenate([jnp.zeros((1,) + parts.shape[1:], jnp.float32), parts])
        return padded[np.asarray(group_map) + 1]

    return part


@partial(jax.jit, static_argnames=("boundaries", "mesh"))
def sharded_prefix_decode(values, indices, W_dec, boundaries: tuple[int, ...], mesh: Mesh):
    """``sae_kernels.jax.prefix_decode`` of a code with global indices [B, k] over W_dec [n, d]
    split on ``latent``, for the prefix sizes ``boundaries`` (m_G = n). -> fp32 [G, B, d]."""
    L = mesh.shape["latent"]
    W = pad_to_multiple(W_dec, L, 0)
    rows = W.shape[0] // L
    code_spec = batch_spec(values.shape[0], mesh)
    W, W_spec, block = _weights_in(W, mesh, _batch_per_device(values.shape[0], code_spec, mesh), values.shape[1])
    branches = [_prefix_part(*_device_prefixes(boundaries, r * rows, rows)) for r in range(L)]

    def body(values, indices, W):
        W = block(W)
        rank = lax.axis_index("latent")
        lo = rank * rows
        mine = (indices >= lo) & (indices < lo + rows)
        part = lax.switch(rank, branches, values, jnp.where(mine, indices - lo, EMPTY), W)
        return lax.psum(part, "latent")

    out_spec = P(None, "data") if code_spec == P("data") else P()
    return jax.shard_map(body, mesh=mesh, in_specs=(code_spec, code_spec, W_spec), out_specs=out_spec,
                         check_vma=False)(values, indices, W)
