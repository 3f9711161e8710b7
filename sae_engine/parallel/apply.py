"""Apply a mesh to a run from outside: the trainer calls these and nothing else of the package.

Two kinds of mesh: a torch.distributed ``ParallelMesh`` (one process per rank, started by
torchrun; train.backend = "torch") and a ``JaxMeshRun`` (one process driving a jax.sharding
mesh of its devices; train.backend = "jax"). Each function does the right thing for either.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoints.single import load_checkpoint
from ..config import ConfigError, RunConfig
from ..checkpoints.dcp import is_sharded, load_rows, save_sharded
from .mesh import ParallelMesh, build_mesh

BUFFER_KEYS = ("buffer.unserved", "buffer.unserved_positions", "buffer.rng")


class JaxMeshRun:
    """A JAX run over a (data, latent) mesh of this process's devices; the ring buffer is on the CPU."""

    device = torch.device("cpu")
    is_main = True

    def __init__(self, config: RunConfig) -> None:
        from .jax_mesh import build_jax_mesh

        self.data, self.latent = config.parallel.data, config.parallel.latent
        self.mesh = build_jax_mesh(self.data, self.latent)
        # What "auto" precision is decided for: the mesh's devices, not the buffer's CPU.
        self.compute_device_type = "cuda" if self.mesh.devices.flat[0].platform == "gpu" else "cpu"


def setup(config: RunConfig, device: torch.device) -> ParallelMesh | JaxMeshRun | None:
    """The mesh ``[parallel]`` asks for (None: one plain process); ConfigError before any write."""
    p = config.parallel
    if config.train.batch_size % p.data:
        raise ConfigError(f"train.batch_size = {config.train.batch_size} does not split over parallel.data = "
                          f"{p.data} ranks")
    if config.train.backend == "jax":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("train.backend = 'jax' drives its mesh from one process; start it without torchrun "
                              "(python -m sae_engine train ...)")
        if p.world_size == 1:
            return None
        why = p.check_latents(config.model.n_latents)
        if why:
            raise ConfigError(f"parallel.latent = {p.latent}: {why} (model.n_latents = {config.model.n_latents})")
        return JaxMeshRun(config)
    return build_mesh(p, config.model.n_latents, device.type)


def parallelize(config: RunConfig, mesh: ParallelMesh | JaxMeshRun):
    """The run's backend laid out over ``mesh`` (torch: see torch_sharded; JAX: see jax_mesh)."""
    if isinstance(mesh, ParallelMesh):
        from .torch_sharded import ShardedTorchSAE

        return ShardedTorchSAE(config, mesh)
    from .jax_mesh import sharded_jax_backend

    return sharded_jax_backend(config, mesh.mesh, config.train.precision_resolved)


def feed(source, capacity: int, dtype: torch.dtype, device: torch.device, seed: int,
         mesh: ParallelMesh | JaxMeshRun | None):
    """What this process trains on (see feed): its rows [B / D, d] of each global batch for a
    torch data rank; every row otherwise (a JAX mesh splits them over its devices itself)."""
    from .feed import make_feed

    if isinstance(mesh, ParallelMesh):
        return make_feed(source, capacity, dtype=dtype, device=device, seed=seed, data_rank=mesh.data_rank,
                         data=mesh.data)
    return make_feed(source, capacity, dtype=dtype, device=device, seed=seed)


def any_rank(flag: bool, mesh: ParallelMesh | JaxMeshRun | None) -> bool:
    """Whether ``flag`` holds on any rank: every rank stops at the same step (a signal reaches
    torchrun's processes at different moments, and a rank that stops alone hangs the rest)."""
    if not isinstance(mesh, ParallelMesh):
        return flag
    votes = torch.tensor([float(flag)], device=mesh.device)
    dist.all_reduce(votes)
    return bool(votes.item() > 0)


def save(run_dir: Path, step: int, backend, ring: dict[str, torch.Tensor], meta: dict[str, Any],
         mesh: ParallelMesh | JaxMeshRun, config: RunConfig) -> Path:
    """Write a checkpoint of a mesh run: DCP for torch, orbax for JAX; ``ring``: the buffer's tensors."""
    keep = config.train.keep_checkpoints
    if isinstance(mesh, ParallelMesh):
        tensors = {**backend.state_tensors(), **ring}
        return save_sharded(run_dir, step, tensors, meta, mesh, config.model.n_latents, keep)
    from ..checkpoints.orbax import save_orbax

    meta = {**meta, "mesh": {"data": mesh.data, "latent": mesh.latent}}
    return save_orbax(run_dir, step, backend.state_arrays(), ring, meta, keep)


def restore(path: Path, backend, mesh: ParallelMesh | JaxMeshRun | None, config: RunConfig, adam_count: int,
            aux_active: bool) -> dict[str, torch.Tensor]:
    """Load a checkpoint of any layout (single-process, DCP or orbax) into this process's backend
    on ``mesh``; returns the ring buffer's tensors."""
    n = config.model.n_latents
    if (Path(path) / "orbax").is_dir():
        from ..checkpoints.orbax import read_ring, read_rows, read_tensors, restore_on_mesh

        if isinstance(mesh, JaxMeshRun):
            restore_on_mesh(path, backend, backend.layout, adam_count, aux_active)
        elif mesh is None:
            backend.load_state_tensors(read_tensors(path, list(backend.state_tensors())), adam_count, aux_active)
        else:
            like = backend.state_tensors()
            backend.load_state_tensors(read_rows(path, like, *mesh.latent_range(n)), adam_count, aux_active)
        return read_ring(path)
    if isinstance(mesh, ParallelMesh):  # this rank's rows
        tensors = load_rows(path, backend.state_tensors(), n, mesh, BUFFER_KEYS)
    elif is_sharded(path):  # one process (a JAX mesh: then placed on it) reads every rank's rows
        tensors = load_rows(path, backend.state_tensors(), n, None, BUFFER_KEYS)
    else:
        tensors = load_checkpoint(path)[0]
    backend.load_state_tensors(tensors, adam_count, aux_active)
    return tensors
