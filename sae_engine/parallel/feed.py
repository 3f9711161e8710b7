"""What each process trains on: its rows of every global batch, read from a disjoint share.

One process (or a JAX mesh, which splits the batch over its devices itself) reads every batch
from a plain ``RingBuffer``. A torch data rank r of D needs rows [r B/D, (r + 1) B/D) of each
global batch of B, in the order one process would serve them:

* ``SharedOrderFeed`` (sources with ``random_access``): every rank runs the same ring buffer
  over stream *positions* (8 bytes a vector, no activations), which serves the same order the
  buffer of vectors would, and reads from the source only the rows of its own share, one batch
  ahead in a background thread (overlapping the step). Each vector is read by the ranks of one
  data group only; checkpoints hold positions, not vectors.
* ``KeepRowsFeed`` (streaming sources, e.g. ESM2 run live): every rank reads the whole stream
  into its own buffer and keeps its rows.

Both keep any mesh exact and resumable on any other: a checkpoint's buffer state is that of the
one global order (unserved positions always; vectors where the buffer holds them).
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..training.buffer import RingBuffer
from ..data.sources import ActivationSource, has_random_access


class PositionSource:
    """Stream positions 0..n-1 as one-column int64 chunks: the order a RingBuffer serves, without data."""

    d = 1

    def __init__(self, n: int, chunk_size: int = 1 << 16) -> None:
        self.n, self.chunk_size = n, chunk_size

    def __len__(self) -> int:
        return self.n

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for lo in range(start, self.n, self.chunk_size):
            yield torch.arange(lo, min(lo + self.chunk_size, self.n)).unsqueeze(1)


class SharedOrderFeed:
    """Data rank ``rank`` of ``parts``: its share of each batch, read by position (module docstring)."""

    def __init__(self, source: ActivationSource, capacity: int, *, dtype: torch.dtype, device: torch.device,
                 seed: int, rank: int, parts: int) -> None:
        self.source, self.dtype, self.device, self.rank, self.parts = source, dtype, device, rank, parts
        self.order = RingBuffer(PositionSource(len(source)), capacity, dtype=torch.int64, seed=seed, background=False)
        self.rows_read = 0  # vectors this rank read from the source for its batches
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feed-read")
        self._ahead: tuple[torch.Tensor, Future] | None = None  # the next batch's positions, being read

    def _share(self, positions: torch.Tensor) -> torch.Tensor:
        """This rank's positions [m / parts] of a global batch's [m, 1]."""
        share = len(positions) // self.parts
        return positions[self.rank * share : (self.rank + 1) * share, 0]

    def _read(self, positions: torch.Tensor) -> torch.Tensor:
        rows = self.source.rows(positions)
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def next_batch(self, batch_size: int, drop_last: bool = False) -> torch.Tensor | None:
        """This rank's rows [batch_size / parts, d] of the next global batch, or None at the end.

        The rows of the batch after it are read in the background while this one trains, where
        the order has already fixed them (all but the batch after each merge of the buffer)."""
        positions = self.order.next_batch(batch_size, drop_last)
        if positions is None:
            return None
        mine = self._share(positions)
        ahead, self._ahead = self._ahead, None
        rows = ahead[1].result() if ahead is not None and torch.equal(ahead[0], mine) else self._read(mine)
        upcoming = self.order.upcoming(batch_size)
        if upcoming is not None:
            following = self._share(upcoming)
            self._ahead = (following, self._reader.submit(self._read, following))
        self.rows_read += len(rows)
        return rows.to(self.device, self.dtype, non_blocking=True)

    def state_dict(self) -> dict:
        state = self.order.state_dict()
        del state["unserved"]  # the positions themselves, also under "unserved_positions"
        return state

    def load_state_dict(self, state: dict) -> None:
        positions = state.get("unserved_positions")
        if positions is None or bool((positions < 0).any()):
            raise ValueError("this checkpoint's buffer state does not record the positions of its unserved vectors "
                             "(written before they were kept); resume it with parallel.data = 1")
        self._ahead = None
        self.order.load_state_dict({**state, "unserved": positions.unsqueeze(1)})


class KeepRowsFeed:
    """Data rank ``rank`` of ``parts`` over a buffer of the whole stream: it keeps its rows."""

    def __init__(self, buffer: RingBuffer, rank: int, parts: int) -> None:
        self.buffer, self.rank, self.parts = buffer, rank, parts

    def next_batch(self, batch_size: int, drop_last: bool = False) -> torch.Tensor | None:
        batch = self.buffer.next_batch(batch_size, drop_last)
        if batch is None:
            return None
        share = len(batch) // self.parts
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict:
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state)


def make_feed(source: ActivationSource, capacity: int, *, dtype: torch.dtype, device: torch.device, seed: int,
              data_rank: int = 0, data: int = 1) -> RingBuffer | SharedOrderFeed | KeepRowsFeed:
    """The feed of data rank ``data_rank`` of ``data`` (a plain RingBuffer for one)."""
    if data > 1 and has_random_access(source):
        return SharedOrderFeed(source, capacity, dtype=dtype, device=device, seed=seed, rank=data_rank, parts=data)
    buffer = RingBuffer(source, capacity, dtype=dtype, device=device, seed=seed)
    return buffer if data == 1 else KeepRowsFeed(buffer, data_rank, data)
