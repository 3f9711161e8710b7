"""The collectives of one process group, with counts of the collectives issued and the bytes
each rank sends.

The byte count follows the ring algorithms gloo and NCCL use: an all-gather of a tensor of ``s``
bytes over ``p`` ranks sends ``(p - 1) * s`` bytes per rank, an all-reduce ``2 (p - 1) / p * s``.
A group of one rank issues no collective and sends nothing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """Collectives over ``group`` (None: the single-process case, where each is the identity)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.bytes_sent = 0
        self.collectives = 0

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order. t: [...] -> [size, ...]."""
        if self.size == 1:
            return t.unsqueeze(0)
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        self.collectives += 1
        self.bytes_sent += (self.size - 1) * t.numel() * t.element_size()
        return torch.stack(parts)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of every rank's ``t``, in place; returns ``t``."""
        return self.start_all_reduce(t).wait()

    def start_all_reduce(self, t: torch.Tensor) -> Pending:
        """Start summing every rank's ``t`` in place and return at once; ``wait()`` on the result
        before reading ``t``. Collectives issued in between run while this one is in flight."""
        if self.size == 1:
            return Pending(t, None)
        work = dist.all_reduce(t, group=self.group, async_op=True)
        self.collectives += 1
        self.bytes_sent += 2 * (self.size - 1) * t.numel() * t.element_size() // self.size
        return Pending(t, work)

    def all_gather_rows(self, t: torch.Tensor, counts: list[int] | None = None) -> list[torch.Tensor]:
        """Every rank's ``t`` [m_r, ...] (m_r may differ), in rank order: counts, then padded rows.

        counts: every rank's m_r when an earlier exchange already told them (saves a collective).
        """
        if self.size == 1:
            return [t]
        if counts is None:
            counts = self.all_gather(torch.tensor([t.shape[0]], device=t.device)).view(-1).tolist()
        padded = t.new_zeros((max(counts),) + tuple(t.shape[1:]))
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded)
        return [gathered[r, :m] for r, m in enumerate(counts)]


class Pending:
    """A collective in flight on ``t``; ``wait()`` blocks until it is done and returns ``t``."""

    def __init__(self, t: torch.Tensor, work: dist.Work | None) -> None:
        self.t, self.work = t, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.t
