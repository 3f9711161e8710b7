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

    def check_latents(self, n_latents: int) -> str | None:
        """Why ``latent`` ranks cannot split ``n_latents`` latents, or None."""
        try:
            latent_ranges(n_latents, self.latent)
        except ValueError as error:
            return str(error)
        return None


def latent_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) latent ranges for ``parts`` ranks: ceil(n / parts) each, the last fewer.

    The same split as a DTensor sharded on dim 0 (torch.chunk), which is what lets
    torch.distributed.checkpoint reshard the rows onto another mesh.

    >>> latent_ranges(10, 4)
    [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    size = -(-n // parts) if parts >= 1 else 0
    if parts < 1 or (parts - 1) * size >= n:
        raise ValueError(f"cannot split {n} latents over {parts} ranks of ceil(n / ranks) = {size} latents "
                         "without leaving a rank empty")
    return [(min(r * size, n), min((r + 1) * size, n)) for r in range(parts)]
