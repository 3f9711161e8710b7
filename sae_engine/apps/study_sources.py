"""Training sources of a study: a corpus scale as the union of its parts' stores, repeated when asked.

- residue level: the rows of the parts' activation stores, read in order (:class:`ShardSource`
  over the parts' shards), the held-out head first;
- protein level: the parts' mean-pooled vectors, each epoch a seeded permutation of them
  (:class:`EpochSource`);
- :class:`RepeatTail`: a source whose head (the held-out rows) appears once and whose rest
  repeats until a token budget is reached (a small corpus trained as long as a larger one).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.sources import ActivationSource, ShardSource, has_random_access


def store_rows(stores: Sequence[Path], layer: int, chunk_size: int = 4096) -> ShardSource:
    """Every row of ``layer`` in the stores, store after store (each must be complete)."""
    from ..esm.store import ActivationStore, StoreError

    paths = []
    for store in stores:
        opened = ActivationStore(store)
        if not opened.complete:
            raise StoreError(f"activation store {store} is incomplete")
        paths.extend(opened.shard_paths(layer))
    return ShardSource(paths, chunk_size=chunk_size)


class RepeatTail:
    """``inner``'s first ``head`` rows once, then its other rows repeated, ``total`` rows in all.

    The trainer holds out a source's first ``data.eval_tokens`` rows: with ``head`` equal to
    that, the held-out rows are never trained on, however often the rest repeats.
    """

    def __init__(self, inner: ActivationSource, head: int, total: int) -> None:
        if not 0 <= head < len(inner):
            raise ValueError(f"head {head} must be below the source's {len(inner)} rows")
        self.inner, self.head, self.total, self.d = inner, head, max(int(total), len(inner)), inner.d
        self.random_access = has_random_access(inner)

    def __len__(self) -> int:
        return self.total

    def _inner_position(self, position: np.ndarray) -> np.ndarray:
        tail = len(self.inner) - self.head
        return np.where(position < self.head, position, self.head + (position - self.head) % tail)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.inner.rows(torch.from_numpy(self._inner_position(positions.numpy())))

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        position = start
        while position < self.total:
            inner_start = int(self._inner_position(np.array([position]))[0])
            for chunk in self.inner.iter_from(inner_start):
                chunk = chunk[: self.total - position]
                yield chunk
                position += len(chunk)
                if position >= self.total:
                    return


class EpochSource:
    """Per-protein vectors ``[N, d]``: the first ``head`` once (held out), then ``epochs`` passes
    over the others, each in its own seeded order (epoch ``e`` uses seed ``seed + e``)."""

    random_access = True

    def __init__(self, vectors: np.ndarray, head: int, epochs: int, seed: int, chunk_size: int = 4096) -> None:
        if not 0 <= head < len(vectors):
            raise ValueError(f"head {head} must be below the {len(vectors)} vectors")
        self.data = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))
        self.head, self.epochs, self.seed, self.chunk_size = head, max(int(epochs), 1), seed, chunk_size
        self.d = self.data.shape[1]
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.head + self.epochs * (len(self.data) - self.head)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.head + np.random.default_rng(self.seed + epoch).permutation(len(self.data) - self.head)}
        return self._orders[epoch]

    def _index(self, positions: np.ndarray) -> np.ndarray:
        tail = len(self.data) - self.head
        out = positions.copy()
        later = positions >= self.head
        epoch, within = np.divmod(positions[later] - self.head, tail)
        picked = np.empty(within.size, dtype=np.int64)
        for e in np.unique(epoch):
            where = epoch == e
            picked[where] = self._order(int(e))[within[where]]
        out[later] = picked
        return out

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.data[torch.from_numpy(self._index(positions.numpy().astype(np.int64)))]

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for lo in range(start, len(self), self.chunk_size):
            yield self.rows(torch.arange(lo, min(lo + self.chunk_size, len(self))))
