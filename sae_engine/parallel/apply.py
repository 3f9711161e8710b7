"""Apply a mesh to a run from outside: the trainer calls these and nothing else of the package."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig
from .checkpoint import is_sharded, load_rows, save_sharded
from .mesh import ParallelMesh, build_mesh

BUFFER_KEYS = ("buffer.unserved", "buffer.rng")


def setup(config: RunConfig, device: torch.device) -> ParallelMesh | None:
    """The mesh ``[parallel]`` asks for (None: one plain process); ConfigError before any write."""
    if config.train.batch_size % config.parallel.data:
        raise ConfigError(f"train.batch_size = {config.train.batch_size} does not split over parallel.data = "
                          f"{config.parallel.data} ranks")
    mesh = build_mesh(config.parallel, config.model.n_latents, device.type)
    if mesh is not None and config.train.backend != "torch":
        raise ConfigError("[parallel] larger than 1 x 1 runs the torch backend (train.backend = 'torch')")
    return mesh


def parallelize(config: RunConfig, mesh: ParallelMesh):
    """The torch backend with its latents split over ``mesh`` (see torch_sharded)."""
    from .torch_sharded import ShardedTorchSAE

    return ShardedTorchSAE(config, mesh)


def local_rows(batch: torch.Tensor, mesh: ParallelMesh | None) -> torch.Tensor:
    """This data rank's rows of a global batch [B, d] -> [B / D, d]."""
    if mesh is None:
        return batch
    size = batch.shape[0] // mesh.data
    return batch[mesh.data_rank * size : (mesh.data_rank + 1) * size]


def any_rank(flag: bool, mesh: ParallelMesh | None) -> bool:
    """Whether ``flag`` holds on any rank: every rank stops at the same step (a signal reaches
    torchrun's processes at different moments, and a rank that stops alone hangs the rest)."""
    if mesh is None:
        return flag
    votes = torch.tensor([float(flag)], device=mesh.device)
    dist.all_reduce(votes)
    return bool(votes.item() > 0)


def save(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], mesh: ParallelMesh,
         config: RunConfig) -> Path:
    return save_sharded(run_dir, step, tensors, meta, mesh, config.model.n_latents, config.train.keep_checkpoints)


def load(path: Path, backend, mesh: ParallelMesh | None, config: RunConfig) -> dict[str, torch.Tensor]:
    """This process's state tensors and the ring buffer's from a checkpoint of any mesh."""
    return load_rows(path, backend.state_tensors(), config.model.n_latents, mesh, BUFFER_KEYS)


def needs_parallel_load(path: Path, mesh: ParallelMesh | None) -> bool:
    """Whether a checkpoint is read through DCP / row slices rather than loaded whole."""
    return mesh is not None or is_sharded(path)
