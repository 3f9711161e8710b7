"""Activation sources for the ring buffer: in-memory arrays, memory-mapped shards, synthetic data.

Each source yields chunks ``[m, d]`` from a given vector offset (``iter_from``), which is what
lets a restored ring buffer continue exactly where a checkpoint left it. Sources with
``random_access`` also read rows by position (``rows``): data-parallel ranks then read only their
share of each batch (:mod:`sae_engine.parallel.feed`). :class:`OffsetSource`
and :class:`PairedSource` combine sources (the training part after the held-out head; inputs
and targets of a transcoder). The built-in ``synthetic`` and ``shards`` sources, with their
``[data.synthetic]`` and ``[data.shards]`` options, are registered at the end
(see :mod:`sae_engine.data.registry`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
import torch

from ..errors import ConfigError
from .registry import SourceSpec


class ActivationSource(Protocol):
    """Anything that yields activation chunks ``[m, d]`` starting at a given vector offset."""

    d: int

    def __len__(self) -> int:
        """Number of vectors (the end of data)."""
        ...

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        """Chunks of the source from vector ``start`` on; shapes [m, d], m >= 1."""
        ...


class RandomAccessSource(ActivationSource, Protocol):
    """A source that also reads rows by position (``random_access`` True)."""

    random_access: bool

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The vectors at ``positions`` [m] (int64, any order), as [m, d]."""
        ...


def has_random_access(source: ActivationSource) -> TypeGuard[RandomAccessSource]:
    """Whether ``source`` reads rows by position (``rows``)."""
    return bool(getattr(source, "random_access", False))


class ArraySource:
    """Vectors held in memory: a tensor or numpy array ``[N, d]`` served in chunks."""

    def __init__(self, data: torch.Tensor | np.ndarray, chunk_size: int = 4096) -> None:
        self.data = torch.as_tensor(data)
        if self.data.dim() != 2:
            raise ValueError(f"activation array must be [N, d], got shape {tuple(self.data.shape)}")
        self.d = self.data.shape[1]
        self.chunk_size = chunk_size

    random_access = True

    def __len__(self) -> int:
        return self.data.shape[0]

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for lo in range(start, len(self), self.chunk_size):
            yield self.data[lo : lo + self.chunk_size]

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.data[positions]


class ShardSource:
    """Vectors stored as ``.npy`` shards ``[N_i, d]``, memory-mapped and read in order."""

    def __init__(self, paths: Sequence[str | Path], chunk_size: int = 4096) -> None:
        if not paths:
            raise ValueError("no activation shards given")
        self.shards = []
        for path in map(Path, paths):
            if not path.exists():
                raise FileNotFoundError(f"activation shard not found: {path}")
            try:
                array = np.load(path, mmap_mode="r")
            except (ValueError, OSError) as error:
                raise ValueError(f"cannot read activation shard {path}: {error}") from error
            if array.ndim != 2:
                raise ValueError(f"activation shard {path} must be [N, d], got shape {array.shape}")
            if array.shape[0] == 0:
                raise ValueError(f"activation shard {path} holds no rows")
            self.shards.append((path, array))
        widths = {array.shape[1] for _, array in self.shards}
        if len(widths) != 1:
            listed = ", ".join(f"{path.name}: d={array.shape[1]}" for path, array in self.shards)
            raise ValueError(f"activation shards disagree on d: {listed}")
        self.d = widths.pop()
        self.chunk_size = chunk_size
        self.starts = np.cumsum([0] + [array.shape[0] for _, array in self.shards])  # shard i: [starts[i], starts[i+1])

    random_access = True

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows by position, each shard's read in ascending order (one gather per shard touched)."""
        where = positions.numpy()
        shard = np.searchsorted(self.starts, where, side="right") - 1
        out = np.empty((len(where), self.d), dtype=self.shards[0][1].dtype)
        for i in np.unique(shard):
            picked = np.nonzero(shard == i)[0]
            local = where[picked] - self.starts[i]
            order = np.argsort(local, kind="stable")
            out[picked[order]] = self.shards[i][1][local[order]]
        return torch.from_numpy(out)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        offset = 0
        for _, array in self.shards:
            rows = array.shape[0]
            lo = max(start - offset, 0)
            for chunk_lo in range(lo, rows, self.chunk_size):
                # np.array copies the slice out of the read-only map.
                yield torch.from_numpy(np.array(array[chunk_lo : chunk_lo + self.chunk_size]))
            offset += rows


class SyntheticSource:
    """Reproducible random vectors for benchmarks: chunk ``i`` depends only on (seed, i).

    A low-rank-plus-noise model gives the vectors some structure, like real activations.
    """

    def __init__(self, d: int, total: int, seed: int = 0, chunk_size: int = 4096, rank: int = 16) -> None:
        self.d, self.total, self.seed, self.chunk_size = d, total, seed, chunk_size
        basis_rng = torch.Generator().manual_seed(seed)
        self.basis = torch.randn(rank, d, generator=basis_rng)

    def __len__(self) -> int:
        return self.total

    random_access = True

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows by position: every chunk they fall in is generated (this source's reads are compute)."""
        chunk = positions // self.chunk_size
        out = torch.empty(len(positions), self.d)
        for index in chunk.unique().tolist():
            picked = (chunk == index).nonzero().squeeze(1)
            out[picked] = self._chunk(index)[positions[picked] - index * self.chunk_size]
        return out

    def _chunk(self, index: int) -> torch.Tensor:
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        m = min(self.chunk_size, self.total - index * self.chunk_size)
        coeff = torch.randn(m, self.basis.shape[0], generator=rng)
        return coeff @ self.basis + 0.1 * torch.randn(m, self.d, generator=rng)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        first = start // self.chunk_size
        for index in range(first, -(-self.total // self.chunk_size)):
            chunk = self._chunk(index)
            yield chunk[start - index * self.chunk_size :] if index == first else chunk


class OffsetSource:
    """A view of a source that starts ``offset`` vectors in (the rest is the held-out set)."""

    def __init__(self, inner: ActivationSource, offset: int) -> None:
        self.inner, self.offset, self.d = inner, offset, inner.d
        self.random_access = has_random_access(inner)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return self.inner.rows(positions + self.offset)

    def __len__(self) -> int:
        return len(self.inner) - self.offset

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        return self.inner.iter_from(start + self.offset)


class PairedSource:
    """Input and target sources read side by side as [m, d_in + d_out] chunks (transcoders)."""

    def __init__(self, inputs: ActivationSource, targets: ActivationSource) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"transcoder inputs hold {len(inputs)} vectors but targets hold {len(targets)}")
        self.inputs, self.targets = inputs, targets
        self.d = inputs.d + targets.d
        self.random_access = has_random_access(inputs) and has_random_access(targets)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inputs.rows(positions).float(), self.targets.rows(positions).float()], dim=1)

    def __len__(self) -> int:
        return len(self.inputs)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for x, y in zip(self.inputs.iter_from(start), self.targets.iter_from(start)):
            yield torch.cat([x.float(), y.float()], dim=1)


# -- the built-in sources of the registry ----------------------------------------------------------


@dataclass
class SyntheticOptions:
    """``[data.synthetic]``: low-rank random vectors (see :class:`SyntheticSource`)."""

    tokens: int = 1_000_000  # training vectors; data.eval_tokens more are made for evaluation


# The built-in sources' checks and builders take the run config as ``Any`` (it imports this
# package; see registry.py).
def _check_synthetic(options: SyntheticOptions, config: Any) -> None:
    if not isinstance(options.tokens, int) or options.tokens < 1:
        raise ConfigError(f"data.synthetic.tokens = {options.tokens!r}: must be a positive integer")


def _build_synthetic(options: SyntheticOptions, config: Any) -> SyntheticSource:
    m = config.model
    return SyntheticSource(m.d_in + (m.d_out or 0), options.tokens + config.data.eval_tokens, seed=config.data.seed)


@dataclass
class ShardOptions:
    """``[data.shards]``: ``.npy`` files ``[N, d]``, read in order."""

    paths: list[str] = field(default_factory=list)
    target_paths: list[str] = field(default_factory=list)  # transcoders: the targets, aligned with paths


def _check_shards(options: ShardOptions, config: Any) -> None:
    if not options.paths:
        raise ConfigError(f"data.shards.paths = {options.paths!r}: source = 'shards' needs at least one .npy file")
    for key in ("paths", "target_paths"):
        for path in getattr(options, key):
            if not Path(path).exists():
                raise ConfigError(f"data.shards.{key} = {path!r}: file not found")
    if config.model.is_transcoder and len(options.target_paths) != len(options.paths):
        raise ConfigError(f"data.shards.target_paths = {options.target_paths!r}: a transcoder needs one target "
                          f"shard per input shard ({len(options.paths)})")


def _build_shards(options: ShardOptions, config: Any) -> ActivationSource:
    m = config.model
    inputs = ShardSource(options.paths)
    if inputs.d != m.d_in:
        raise ConfigError(f"data.shards.paths: shards have d={inputs.d} but model.d_in = {m.d_in}")
    if not m.is_transcoder:
        return inputs
    targets = ShardSource(options.target_paths)
    if targets.d != m.d_out:
        raise ConfigError(f"data.shards.target_paths: shards have d={targets.d} but model.d_out = {m.d_out}")
    return PairedSource(inputs, targets)


SYNTHETIC = SourceSpec("synthetic", SyntheticOptions, _build_synthetic, _check_synthetic)
SHARDS = SourceSpec("shards", ShardOptions, _build_shards, _check_shards)
