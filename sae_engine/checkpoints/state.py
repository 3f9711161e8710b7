"""Reading a run's training state back from a checkpoint of any layout, for one process or a rank."""
from __future__ import annotations

from pathlib import Path

import torch

from .dcp import RankPlace, load_rows
from .keys import RING_KEYS
from .meta import ORBAX, SINGLE, layout_of
from .single import load_checkpoint


def read_state(path: Path, like: dict[str, torch.Tensor], n: int, place: RankPlace | None = None) -> dict[str, torch.Tensor]:
    """This process's state tensors from checkpoint ``path`` (single, DCP or orbax), with the
    ring buffer's tensors where stored; CheckpointError when it cannot be read.

    like: this process's state tensors (row tensors: its rows), whose names, shapes and dtypes the
    result takes; place: a latent rank's place (its rows [lo, hi) of n), None for one process.
    """
    layout = layout_of(path)
    if layout == SINGLE and place is None:  # every tensor as saved (the statistics' absorbing slot too)
        return load_checkpoint(path)[0]
    if layout != ORBAX:
        return load_rows(path, like, n, place, RING_KEYS)
    from .orbax import read_ring, read_rows, read_tensors

    state = read_tensors(path, list(like)) if place is None else read_rows(path, like, *place.latent_range(n))
    return {**state, **read_ring(path)}
