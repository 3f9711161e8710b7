"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resharded on load.

Layout of ``<run>/checkpoints/step_000001234/`` for a latent- or data-sharded torch run:
    dcp/        DCP's files: every rank writes its own rows, replicated tensors are written once
    meta.json   config, step, mesh, counters and file sizes, as for a single-process checkpoint
The per-latent tensors (``keys.has_latent_rows``: W_enc, b_enc, W_dec, their Adam moments,
firing statistics) are saved as DTensors sharded on rows over the ``latent`` mesh dimension, so
DCP can read any row range back: a run resumes on another mesh (latent 2 -> 4, 2x2 -> 1x4), in
one process, or from a single-process checkpoint (rows read from its safetensors files). Every
rank writes into the temporary folder rank 0 made; rank 0 writes meta.json and commits once all
parts are on disk (``folder.commit``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .folder import commit, step_folder, writing
from .keys import STATISTICS, has_latent_rows
from .meta import DCP, CheckpointError, layout_of, write_meta


class RankPlace(Protocol):
    """What a sharded save or load needs of this process's place in the mesh."""

    device_mesh: DeviceMesh | None
    is_main: bool

    def latent_range(self, n: int) -> tuple[int, int]: ...


def _as_rows(key: str, t: torch.Tensor, n_local: int) -> torch.Tensor:
    """A rank's rows of a row tensor (the statistics drop their absorbing slot)."""
    return t[:n_local] if key in STATISTICS else t


def _dtensor(local: torch.Tensor, place: RankPlace, n: int) -> DTensor:
    shape = (n,) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), place.device_mesh, [Replicate(), Shard(0)],
                              shape=torch.Size(shape), stride=stride)


def save_sharded(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], place: RankPlace,
                 n: int, keep: int = 2) -> Path:
    """Every rank calls this with its own tensors (row tensors: its rows); see the module docstring.
    A failed write raises CheckpointWriteError on every rank, the previous checkpoint kept."""
    with writing(run_dir, step, create=place.is_main) as tmp:
        dist.barrier()
        lo, hi = place.latent_range(n)
        state = {key: _dtensor(_as_rows(key, t, hi - lo), place, n) if has_latent_rows(key) else t.contiguous()
                 for key, t in tensors.items()}
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / DCP)))  # raises on every rank if one fails
        if place.is_main:
            write_meta(tmp, meta)
    if place.is_main:
        commit(run_dir, step, keep)
    dist.barrier()
    return step_folder(run_dir, step)


def load_rows(path: Path, like: dict[str, torch.Tensor], n: int, place: RankPlace | None,
              extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """This process's tensors from a checkpoint of any torch layout (DCP or single-process).

    like: this process's state tensors (row tensors: its rows, statistics with their extra
    slot), whose shapes and dtypes the result takes; extra: keys of other tensors to read
    whole where present (the ring buffer's). place None: one process, rows [0, n).
    """
    lo, hi = (0, n) if place is None else place.latent_range(n)
    path = Path(path)
    try:
        if layout_of(path) != DCP:
            return _load_single(path, like, lo, hi, extra)
        return _load_dcp(path, like, n, place, lo, hi, extra)
    except CheckpointException as error:  # a BaseException, which `except Exception` would miss
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(error).split())}") from None
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None


def _load_dcp(path: Path, like: dict[str, torch.Tensor], n: int, place: RankPlace | None, lo: int, hi: int,
              extra: tuple[str, ...]) -> dict[str, torch.Tensor]:
    reader = dcp.FileSystemReader(str(path / DCP))
    stored = reader.read_metadata().state_dict_metadata
    state: dict[str, Any] = {}
    for key, t in like.items():
        if key not in stored:
            raise CheckpointError(f"checkpoint {path} has no tensor {key!r}")
        if has_latent_rows(key):
            rows = torch.empty_like(_as_rows(key, t, hi - lo))
            state[key] = rows if place is None else _dtensor(rows, place, n)
        else:
            state[key] = torch.empty_like(t)
    for key in (key for key in extra if key in stored):  # extra tensors a checkpoint may lack
        state[key] = torch.empty(tuple(stored[key].size), dtype=stored[key].properties.dtype)
    with warnings.catch_warnings():  # one process reading on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=place is None)
    out = {}
    for key, value in state.items():
        local = value.to_local() if isinstance(value, DTensor) else value
        if key in STATISTICS:  # put back the absorbing slot
            local = torch.cat([local, like[key][hi - lo :]])
        out[key] = local
    return out


def _load_single(path: Path, like: dict[str, torch.Tensor], lo: int, hi: int, extra: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) from a single-process checkpoint's safetensors files, reading only those rows."""
    out = {}
    for name in ("model.safetensors", "state.safetensors"):
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():
                if key in extra:
                    out[key] = handle.get_tensor(key)
                elif key in like:
                    if has_latent_rows(key):
                        rows = handle.get_slice(key)[lo:hi]
                        out[key] = torch.cat([rows, like[key][hi - lo :]]) if key in STATISTICS else rows
                    else:
                        out[key] = handle.get_tensor(key)
    missing = set(like) - set(out)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {sorted(missing)}")
    return out
