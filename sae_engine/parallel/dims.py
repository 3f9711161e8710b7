"""The ``[parallel]`` config section and how latents are split over the ``latent`` mesh dimension.

Kept free of torch.distributed so the run config can import it cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Mesh degrees: ``data`` ranks read disjoint batches, ``latent`` ranks split the latents.

    ``data * latent`` is the world size; 1 x 1 (the default) is one process without
    torch.distributed.
    """

    data: int = 1
    latent: int = 1

    @property
    def world_size(self) -> int:
        return self.data * self.latent

    def problems(self) -> list[tuple[str, object, str]]:
        """(key, value, why) for every value that cannot work on its own."""
        out = []
        for key, value in (("parallel.data", self.data), ("parallel.latent", self.latent)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append((key, value, "must be a positive integer"))
        return out


def latent_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) latent ranges for ``parts`` ranks; the first ``n % parts`` get one more.

    >>> latent_ranges(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} latents over {parts} ranks (each needs at least one)")
    base, extra = divmod(n, parts)
    bounds = [0]
    for rank in range(parts):
        bounds.append(bounds[-1] + base + (rank < extra))
    return list(zip(bounds[:-1], bounds[1:]))
