"""The scale-out placements, applied to a plain run from outside (``training.placement``).

* ``TorchMesh``: one process per rank of a (data, latent) torch.distributed mesh, started by
  torchrun (train.backend = "torch"): a ``TorchSAE`` of this rank's latents, this data
  rank's share of every batch, DCP checkpoints, collective stop votes.
* ``JaxMesh``: one process driving a jax.sharding mesh of its devices (train.backend = "jax"):
  the JAX backend laid out over the mesh, every batch whole on the CPU (the mesh splits it),
  orbax checkpoints.
``torch_placement`` and ``jax_placement`` pick one of these, or ``OneProcess`` for 1 x 1.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoints.keys import RING_KEYS, is_row_param
from ..checkpoints.state import read_state
from ..config import ConfigError, RunConfig
from ..data.sources import ActivationSource
from ..training.backend import SAEBackend
from ..training.placement import OneProcess, Placement, resolve_device
from .mesh import ParallelMesh, build_mesh


def _ring(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: t for key, t in tensors.items() if key in RING_KEYS}


class TorchMesh:
    """A torch.distributed (data, latent) mesh; see the module docstring."""

    def __init__(self, mesh: ParallelMesh) -> None:
        self.mesh = mesh
        self.device = mesh.device
        self.compute_device_type = mesh.device.type
        self.is_main = mesh.is_main

    def feed(self, source: ActivationSource, capacity: int, dtype: torch.dtype, seed: int):
        from .feed import make_feed

        return make_feed(source, capacity, dtype=dtype, device=self.device, seed=seed,
                         data_rank=self.mesh.data_rank, data=self.mesh.data)

    def backend(self, config: RunConfig, precision: str) -> SAEBackend:
        from .torch_sharded import sharded_torch_backend

        return sharded_torch_backend(config, self.mesh, precision)

    def save(self, run_dir: Path, step: int, backend: SAEBackend, ring: dict[str, torch.Tensor],
             meta: dict[str, Any], keep: int) -> Path:
        from ..checkpoints.dcp import save_sharded

        meta = {**meta, "mesh": {"data": self.mesh.data, "latent": self.mesh.latent}}
        n = meta["config"]["model"]["n_latents"]
        return save_sharded(run_dir, step, {**backend.state_tensors(), **ring}, meta, self.mesh, n, keep)

    def restore(self, path: Path, backend: SAEBackend, config: RunConfig, adam_count: int,
                aux_active: bool) -> dict[str, torch.Tensor]:
        tensors = read_state(path, backend.state_tensors(), config.model.n_latents, self.mesh)  # this rank's rows
        backend.load_state_tensors(tensors, adam_count, aux_active)
        return _ring(tensors)

    def any(self, flag: bool) -> bool:
        """A vote over every rank: a signal reaches torchrun's processes at different moments, and a
        rank that stops alone hangs the rest."""
        votes = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(votes)
        return bool(votes.item() > 0)


class JaxMesh:
    """A JAX run over a (data, latent) mesh of this process's devices; the ring buffer is on the CPU."""

    device = torch.device("cpu")
    is_main = True

    def __init__(self, config: RunConfig) -> None:
        from .jax_mesh import build_jax_mesh

        self.data, self.latent = config.parallel.data, config.parallel.latent
        self.mesh = build_jax_mesh(self.data, self.latent)
        # What "auto" precision is decided for: the mesh's devices, not the buffer's CPU.
        self.compute_device_type = "cuda" if self.mesh.devices.flat[0].platform == "gpu" else "cpu"
        self.one = OneProcess(config)

    def feed(self, source: ActivationSource, capacity: int, dtype: torch.dtype, seed: int):
        return self.one.feed(source, capacity, dtype, seed)

    def backend(self, config: RunConfig, precision: str) -> SAEBackend:
        from .jax_mesh import sharded_jax_backend

        return sharded_jax_backend(config, self.mesh, precision)

    def save(self, run_dir: Path, step: int, backend: SAEBackend, ring: dict[str, torch.Tensor],
             meta: dict[str, Any], keep: int) -> Path:
        from ..checkpoints.orbax import save_orbax

        meta = {**meta, "mesh": {"data": self.data, "latent": self.latent}}
        return save_orbax(run_dir, step, backend.state_arrays(), ring, meta, keep)

    def restore(self, path: Path, backend: SAEBackend, config: RunConfig, adam_count: int,
                aux_active: bool) -> dict[str, torch.Tensor]:
        from ..checkpoints.meta import ORBAX, layout_of

        if layout_of(path) != ORBAX:  # read whole, then placed on the mesh by the backend
            return self.one.restore(path, backend, config, adam_count, aux_active)
        from ..checkpoints.orbax import read_ring, restore_arrays

        layout = backend.layout
        arrays = restore_arrays(path, backend.state_arrays(), lambda key: layout.sharding(is_row_param(key)))
        backend.load_state_arrays(arrays, adam_count, aux_active)  # each device read its rows
        return read_ring(path)

    def any(self, flag: bool) -> bool:
        return flag


def check_latent_split(config: RunConfig) -> None:
    """ConfigError for a model whose per-latent tensors the sharded checkpoints cannot yet split:
    JumpReLU's thresholds, until ``checkpoints.keys`` lists them among the row parameters."""
    if config.model.kind == "jumprelu" and config.parallel.latent > 1 and not is_row_param("param.threshold"):
        raise ConfigError(f"parallel.latent = {config.parallel.latent}: model.kind = 'jumprelu' trains split over "
                          "data ranks only for now (its sharded checkpoints cannot split param.threshold by latent)")


def torch_placement(config: RunConfig) -> Placement:
    """One process, or this process's rank of the torchrun mesh ``[parallel]`` asks for."""
    check_latent_split(config)
    mesh = build_mesh(config.parallel, config.model.n_latents, resolve_device(config.train.device).type)
    return OneProcess(config) if mesh is None else TorchMesh(mesh)


def jax_placement(config: RunConfig) -> Placement:
    """One process, or a JAX mesh of this process's devices."""
    p = config.parallel
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("train.backend = 'jax' drives its mesh from one process; start it without torchrun "
                          "(python -m sae_engine train ...)")
    if p.world_size == 1:
        return OneProcess(config)
    check_latent_split(config)
    why = p.check_latents(config.model.n_latents)
    if why:
        raise ConfigError(f"parallel.latent = {p.latent}: {why} (model.n_latents = {config.model.n_latents})")
    return JaxMesh(config)
