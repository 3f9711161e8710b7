"""A ``JaxSAE`` over a data x latent ``jax.sharding.Mesh``, applied from outside as its Layout.

One process drives every device of the mesh (JAX's single-controller model; on CPU, host
devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=N``). The per-latent arrays
(W_enc, b_enc, W_dec and their Adam moments) are split in contiguous row blocks over
``latent``, padded to a multiple of L rows (the split ``latent_ranges`` gives torch ranks);
everything else is replicated. Codes come from the exact sharded selection and decoder of
``jax_sharded``, whose gradients of W are summed over ``data`` by touched rows where that pays;
a batch is split over ``data``, and XLA adds the other reductions the loss, the gradients and
BatchTopK's global threshold need. The compiled step is the one-device step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sae_kernels import jax as kj

from ..checkpoints.keys import ROW_PARAMS
from ..config import ConfigError, RunConfig
from ..training.jax_backend import JaxSAE
from .jax_sharded import batch_spec, make_mesh, sharded_decode, sharded_prefix_decode, sharded_topk


@dataclass(frozen=True)
class MeshKernels:
    """``sae_kernels.jax``'s code kernels over W split on the mesh's ``latent`` axis."""

    mesh: Mesh

    def topk_encode(self, x, W_enc, b_enc, k: int, latent_mask=None):
        return sharded_topk(x, W_enc, b_enc, k, self.mesh, latent_mask=latent_mask)

    def sparse_decode(self, values, indices, W_dec):
        return sharded_decode(values, indices, W_dec, self.mesh)

    def threshold_encode(self, x, W_enc, b_enc, threshold, cap: int, band=None):
        # One computation over the whole mesh as XLA partitions it (correct, not yet the per-device
        # compaction a latent split would want); placements refuse JumpReLU with latent > 1 for now.
        return kj.threshold_encode(x, W_enc, b_enc, threshold, cap, band=band)

    def prefix_decode(self, values, indices, W_dec, boundaries: tuple[int, ...]):
        return sharded_prefix_decode(values, indices, W_dec, tuple(boundaries), self.mesh)


def _is_row_path(path: tuple) -> bool:
    """Whether a leaf of the model or optimizer state belongs to a per-latent parameter."""
    return any(getattr(key, "key", getattr(key, "name", None)) in ROW_PARAMS for key in path)


class MeshLayout:
    """``jax_backend.Layout`` for a (data, latent) mesh; see the module docstring."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.kernels = MeshKernels(mesh)
        self.latent = mesh.shape["latent"]

    def rows(self, n: int) -> int:
        return -(-n // self.latent) * self.latent

    def sharding(self, per_latent: bool) -> NamedSharding:
        """Per-latent arrays split on rows over ``latent``; the rest replicated."""
        return NamedSharding(self.mesh, P("latent") if per_latent else P())

    def place_state(self, tree: Any, batch: jax.Array) -> Any:
        del batch  # the mesh, not the batch, decides
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: jax.device_put(leaf, self.sharding(_is_row_path(path) and leaf.ndim > 0)), tree)

    def place_batch(self, x: jax.Array) -> jax.Array:
        return jax.device_put(x, NamedSharding(self.mesh, batch_spec(x.shape[0], self.mesh)))


def build_jax_mesh(data: int, latent: int) -> Mesh:
    """The (data, latent) mesh over the first data * latent of JAX's devices; ConfigError when
    there are fewer."""
    devices = jax.devices()
    if len(devices) < data * latent:
        hint = (f"; on the CPU, start with XLA_FLAGS=--xla_force_host_platform_device_count={data * latent}"
                if devices[0].platform == "cpu" else "")
        raise ConfigError(f"[parallel] data = {data} x latent = {latent} needs {data * latent} JAX devices, "
                          f"JAX sees {len(devices)} ({devices[0].platform}){hint}")
    return make_mesh(data, latent, devices)


def sharded_jax_backend(config: RunConfig, mesh: Mesh, precision: str) -> JaxSAE:
    """The JAX backend of ``config`` laid out over ``mesh``, computing in ``precision`` ("bf16"
    or "fp32")."""
    return JaxSAE(config, precision, MeshLayout(mesh))
