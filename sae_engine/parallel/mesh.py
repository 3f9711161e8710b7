"""The process mesh: torchrun's environment, torch.distributed and a data x latent DeviceMesh.

torchrun (one node: ``--standalone --nproc-per-node N``; several nodes: its own ``--nnodes``,
``--node-rank``, ``--rdzv-backend``, ``--rdzv-endpoint`` flags) sets RANK, WORLD_SIZE and
LOCAL_RANK; nothing here launches processes or moves bytes itself. Ranks are laid out
row-major over (data, latent): the ranks of one latent group are neighbours (one node, fast
links, for the per-step collectives) and a data group strides across them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from .comm import Comm
from ..parallel_config import ParallelConfig, latent_ranges


@dataclass
class ParallelMesh:
    """This process's place in the mesh and the collectives of its two groups."""

    data: int
    latent: int
    data_rank: int
    latent_rank: int
    data_comm: Comm
    latent_comm: Comm
    device: torch.device
    device_mesh: DeviceMesh | None = None

    def latent_range(self, n: int) -> tuple[int, int]:
        """This rank's [lo, hi) of ``n`` latents."""
        return latent_ranges(n, self.latent)[self.latent_rank]

    @property
    def is_main(self) -> bool:
        """Whether this is global rank 0 (the one that writes shared files)."""
        return self.data_rank == 0 and self.latent_rank == 0

    @property
    def bytes_sent(self) -> int:
        return self.data_comm.bytes_sent + self.latent_comm.bytes_sent


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's environment, or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def check_parallel(parallel: ParallelConfig, n_latents: int, world_size: int | None) -> None:
    """Every reason the mesh cannot be built, as one ConfigError; world_size None: no torchrun."""
    D, L = parallel.data, parallel.latent
    if world_size is None:
        if D * L > 1:
            raise ConfigError(
                f"[parallel] data = {D}, latent = {L} needs {D * L} processes: start it with torchrun, e.g. "
                f"`torchrun --standalone --nproc-per-node {D * L} -m sae_engine train ...`")
        return
    if D * L != world_size:
        raise ConfigError(f"[parallel] data = {D} x latent = {L} = {D * L} ranks, but torchrun started "
                          f"WORLD_SIZE = {world_size} processes; make them equal")
    why = parallel.check_latents(n_latents)
    if why:
        raise ConfigError(f"parallel.latent = {L}: {why} (model.n_latents = {n_latents})")


def build_mesh(parallel: ParallelConfig, n_latents: int, device_type: str, timeout_s: float = 600.0) -> ParallelMesh | None:
    """Start torch.distributed and the (data, latent) mesh; None for a plain single process.

    device_type: "cpu" (gloo) or "cuda" (nccl, one device per local rank). Raises ConfigError,
    before any collective, when the mesh does not match the processes torchrun started.
    """
    env = torchrun_env()
    if env is None or (env[1] == 1 and parallel.world_size == 1):
        check_parallel(parallel, n_latents, None)
        return None
    rank, world_size, local_rank = env
    check_parallel(parallel, n_latents, world_size)
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=device if device_type == "cuda" else None)
    mesh = init_device_mesh(device_type, (parallel.data, parallel.latent), mesh_dim_names=("data", "latent"))
    data_rank, latent_rank = divmod(rank, parallel.latent)
    return ParallelMesh(parallel.data, parallel.latent, data_rank, latent_rank,
                        Comm(mesh.get_group("data")), Comm(mesh.get_group("latent")), device, mesh)
