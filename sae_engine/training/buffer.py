"""A device-resident shuffling ring buffer of activation vectors.

The buffer holds ``capacity`` vectors of width ``d``. A producer pulls chunks ``[m, d]`` from an
activation source into free slots; the trainer draws batches from the filled slots in a random
order. Once half of the slots have been served, the producer refills the free half (in a
background thread, overlapping training) and the new vectors are shuffled in with the ones not
yet served, so each batch mixes vectors from many chunks of the source.

Guarantees: every vector read from the source is served exactly once (no duplicates within or
across fills, nothing skipped); ``tokens_read`` and ``tokens_served`` count exactly; when the
source ends, the remaining vectors are drained and iteration stops (a final short batch is
returned unless ``drop_last``). ``state_dict`` captures the unserved vectors and their stream
positions, the source position and the RNG, so a restored buffer serves exactly the batches the
original would have; from positions alone when the source reads rows by position. The serving
order depends only on the capacity, the seed and the source's length (not on its chunking or
the producer's speed), which is what lets data-parallel ranks replay it over positions
(:mod:`sae_engine.parallel.feed`).
On CUDA the refill's host-to-device copies run on their own stream.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from ..data.sources import ActivationSource


class RingBuffer:
    """Shuffling activation buffer. See the module docstring for the guarantees."""

    def __init__(
        self,
        source: ActivationSource,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        background: bool = True,
    ) -> None:
        if capacity < 2:
            raise ValueError(f"buffer capacity must be at least 2 vectors, got {capacity}")
        self.source = source
        self.capacity = capacity
        self.device = torch.device(device)
        self.storage = torch.empty(capacity, source.d, dtype=dtype, device=self.device)
        self.positions = torch.full((capacity,), -1, dtype=torch.int64)  # each slot's position in the source
        self.generator = torch.Generator().manual_seed(seed)
        self.background = background
        self.tokens_read = 0
        self.tokens_served = 0
        self._queue = torch.empty(0, dtype=torch.int64)  # filled slots not yet served, in serving order
        self._free = torch.arange(capacity)  # slots that may be overwritten
        self._chunks: Iterator[torch.Tensor] | None = None
        self._leftover: torch.Tensor | None = None  # part of a source chunk that did not fit
        self._exhausted = False
        self._refill: threading.Thread | None = None
        self._refill_error: BaseException | None = None
        self._pending = False  # a refill was started and its vectors are not merged yet
        self._fresh = torch.empty(0, dtype=torch.int64)  # slots filled by that refill
        self._copy_stream: torch.cuda.Stream | None = None  # CUDA only: the producer's stream

    # -- producer ------------------------------------------------------------------------------

    def _fill(self, slots: torch.Tensor) -> torch.Tensor:
        """Copy source vectors into ``slots`` in order; returns the slots actually filled.

        On CUDA the copies run on a side stream, so they overlap the training step's kernels;
        ``_wait_refill`` makes the consumer's stream wait for them.
        """
        if self.device.type == "cuda":
            self._copy_stream = self._copy_stream or torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                return self._fill_on_current_stream(slots)
        return self._fill_on_current_stream(slots)

    def _fill_on_current_stream(self, slots: torch.Tensor) -> torch.Tensor:
        if self._chunks is None:
            self._chunks = iter(self.source.iter_from(self.tokens_read))
        filled = 0
        while filled < len(slots) and not self._exhausted:
            chunk = self._leftover
            self._leftover = None
            if chunk is None:
                chunk = next(self._chunks, None)
                if chunk is None:
                    self._exhausted = True
                    break
                if chunk.dim() != 2 or chunk.shape[1] != self.source.d:
                    raise ValueError(
                        f"activation source yielded a chunk of shape {tuple(chunk.shape)}; expected [m, {self.source.d}]"
                    )
            take = min(len(slots) - filled, chunk.shape[0])
            target = slots[filled : filled + take].to(self.device)
            piece = chunk[:take]
            if self.device.type == "cuda" and piece.device.type == "cpu":
                piece = piece.pin_memory()  # pinned, so the host-to-device copy is asynchronous
            self.storage.index_copy_(0, target, piece.to(self.device, self.storage.dtype, non_blocking=True))
            self.positions[slots[filled : filled + take]] = torch.arange(self.tokens_read, self.tokens_read + take)
            if take < chunk.shape[0]:
                self._leftover = chunk[take:]
            filled += take
            self.tokens_read += take
        return slots[:filled]

    def _start_refill(self) -> None:
        slots, self._free = self._free, torch.empty(0, dtype=torch.int64)
        self._pending = True

        def work() -> None:
            try:
                self._fresh = self._fill(slots)
            except BaseException as error:  # handed to the consumer thread
                self._refill_error = error

        if self.background:
            self._refill = threading.Thread(target=work, name="ring-buffer-refill", daemon=True)
            self._refill.start()
        else:
            work()

    def _wait_refill(self) -> None:
        if self._refill is not None:
            self._refill.join()
            self._refill = None
        if self._copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        if self._refill_error is not None:
            error, self._refill_error = self._refill_error, None
            self._pending = False
            raise error

    def _merge_refill(self) -> None:
        """Shuffle the refilled vectors in with those not yet served.

        This happens only when the queue runs short, never earlier, so the serving order does not
        depend on how fast the producer thread was.
        """
        self._wait_refill()
        pool = torch.cat([self._queue, self._fresh])
        self._queue = pool[torch.randperm(len(pool), generator=self.generator)]
        self._fresh = torch.empty(0, dtype=torch.int64)
        self._pending = False

    # -- consumer ------------------------------------------------------------------------------

    def next_batch(self, batch_size: int, drop_last: bool = False) -> torch.Tensor | None:
        """The next ``[batch_size, d]`` batch, a shorter final one, or None at the end of data."""
        if not self._pending and not self._exhausted and len(self._free) >= self.capacity // 2:
            self._start_refill()
        while len(self._queue) < batch_size and (self._pending or (not self._exhausted and len(self._free))):
            if not self._pending:
                self._start_refill()
            self._merge_refill()
        if len(self._queue) == 0 or (drop_last and len(self._queue) < batch_size):
            return None
        slots, self._queue = self._queue[:batch_size], self._queue[batch_size:]
        batch = self.storage[slots.to(self.device)]
        self._free = torch.cat([self._free, slots])
        self.tokens_served += len(slots)
        return batch

    def upcoming(self, batch_size: int) -> torch.Tensor | None:
        """The batch the next ``next_batch(batch_size)`` will serve, where it is already fixed
        (enough vectors queued, so no merge comes first); None otherwise. Changes nothing."""
        if len(self._queue) < batch_size:
            return None
        return self.storage[self._queue[:batch_size].to(self.device)]

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[torch.Tensor]:
        """Iterate batches until the source is exhausted and the buffer drained."""
        while (batch := self.next_batch(batch_size, drop_last)) is not None:
            yield batch

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Unserved vectors (queued, then refilled but not merged) and their stream positions,
        source position and RNG state."""
        if self._pending:
            self._wait_refill()
        # A chunk remainder that did not fit is not saved: tokens_read excludes it, so the
        # reopened source yields it again.
        parts = [self.storage[self._queue.to(self.device)], self.storage[self._fresh.to(self.device)]]
        return {
            "unserved": torch.cat(parts).cpu(),
            "unserved_positions": torch.cat([self.positions[self._queue], self.positions[self._fresh]]),
            "n_queued": len(self._queue),
            "n_fresh": len(self._fresh),
            "pending": self._pending,
            "tokens_read": self.tokens_read,
            "tokens_served": self.tokens_served,
            "exhausted": self._exhausted,
            "rng": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a buffer saved by ``state_dict`` (same capacity, source and dtype). Without
        "unserved" the vectors are read back by position (sources with ``random_access``)."""
        n_queued, n_fresh = int(state["n_queued"]), int(state["n_fresh"])
        held = n_queued + n_fresh
        if held > self.capacity:
            raise ValueError(f"saved buffer holds {held} vectors, more than this buffer's capacity {self.capacity}")
        positions = state.get("unserved_positions")  # absent in checkpoints from before positions were kept
        self.positions.fill_(-1)
        if positions is not None:
            self.positions[:held] = positions
        unserved = state.get("unserved")
        if unserved is None:
            if positions is None or not getattr(self.source, "random_access", False):
                raise ValueError("the saved buffer state holds neither its unserved vectors nor positions this "
                                 "source can read back")
            unserved = self.source.rows(positions) if held else torch.empty(0, self.source.d)
        self.storage[:held] = unserved.to(self.device, self.storage.dtype)
        self._queue = torch.arange(n_queued)
        self._fresh = torch.arange(n_queued, held)
        self._pending = bool(state["pending"])
        self._free = torch.arange(held, self.capacity)
        self._leftover = None
        self.tokens_read = int(state["tokens_read"])
        self.tokens_served = int(state["tokens_served"])
        self._exhausted = bool(state["exhausted"])
        self._chunks = None  # reopened at tokens_read on the next fill
        self.generator.set_state(state["rng"])
