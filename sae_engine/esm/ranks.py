"""The ranks of a torchrun extraction: which process this is, its device, and a bounded barrier.

Under torchrun (WORLD_SIZE > 1) every rank reads the whole input, runs every ``world_size``-th
batch of the one-process plan on its own device (cuda:LOCAL_RANK, else the CPU) and commits its
own shards; rank 0 merges the manifests once all ranks have passed the barrier.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..parallel.mesh import torchrun_env


@dataclass
class Ranks:
    """This process's rank among ``world_size`` extraction processes."""

    rank: int
    world_size: int
    device: torch.device
    timeout_s: float
    started_group: bool  # this module started torch.distributed, so it ends it

    def barrier(self) -> None:
        """Wait for every rank, at most ``timeout_s`` seconds (a dead rank fails it, naming it on gloo)."""
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s))
        else:
            dist.barrier()

    def close(self) -> None:
        if self.started_group:
            dist.destroy_process_group()


def join_ranks(timeout_s: float) -> Ranks | None:
    """Start torch.distributed for an extraction under torchrun; None for one process."""
    env = torchrun_env()
    if env is None or env[1] == 1:
        return None
    rank, world_size, local_rank = env
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(rank, world_size, device, timeout_s, started)
