"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resharded on load.

Layout of ``<run>/checkpoints/step_000001234/`` for a sharded run:
    dcp/        DCP's files: every rank writes its own rows, replicated tensors are written once
    meta.json   config, step, mesh and counters, as for a single-process checkpoint
The per-latent tensors (W_enc, b_enc, W_dec, their Adam moments, firing statistics) are saved
as DTensors sharded on rows over the ``latent`` mesh dimension, so DCP can read any row range
back: a run resumes on another mesh (latent 2 -> 4, 2x2 -> 1x4), in one process, or from a
single-process checkpoint (rows read from its safetensors files). The folder is written under
a temporary name and renamed by rank 0 once every rank's part is on disk, then ``latest`` is
replaced: a crash leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Replicate, Shard

from .single import FORMAT_VERSION
from ..parallel.mesh import ParallelMesh

ROW_PARAMS = ("W_enc", "b_enc", "W_dec")
STATISTICS = ("buffer.since_fired", "buffer.fire_count")  # [n + 1]: slot n absorbs empty slots


def is_row_key(key: str) -> bool:
    """Whether a state tensor has one row per latent (sharded over ``latent``)."""
    return key in STATISTICS or any(key == f"{kind}.{name}" for kind in ("param", "adam.m", "adam.v") for name in ROW_PARAMS)


def is_sharded(path: Path) -> bool:
    return (Path(path) / "dcp").is_dir()


def _as_rows(key: str, t: torch.Tensor, n_local: int) -> torch.Tensor:
    """A rank's rows of a row tensor (the statistics drop their absorbing slot)."""
    return t[:n_local] if key in STATISTICS else t


def _dtensor(local: torch.Tensor, mesh: ParallelMesh, n: int) -> DTensor:
    shape = (n,) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), mesh.device_mesh, [Replicate(), Shard(0)], shape=torch.Size(shape), stride=stride)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_sharded(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], mesh: ParallelMesh,
                 n: int, keep: int = 2) -> Path:
    """Every rank calls this with its own tensors (row tensors: its rows); see the module docstring."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:09d}", root / f".tmp_step_{step:09d}"
    if mesh.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    lo, hi = mesh.latent_range(n)
    state = {key: _dtensor(_as_rows(key, t, hi - lo), mesh, n) if is_row_key(key) else t.contiguous()
             for key, t in tensors.items()}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / "dcp")))
    if mesh.is_main:
        meta = {"format_version": FORMAT_VERSION, "mesh": {"data": mesh.data, "latent": mesh.latent}, **meta}
        with open(tmp / "meta.json", "w") as handle:
            handle.write(json.dumps(meta, indent=2, sort_keys=True))
            handle.flush()
            os.fsync(handle.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(root)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "meta.json").read_text())


def load_rows(path: Path, like: dict[str, torch.Tensor], n: int, mesh: ParallelMesh | None,
              extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """This process's tensors from a checkpoint of any mesh (or a single-process one).

    like: this process's state tensors (row tensors: its rows, statistics with their extra
    slot), whose shapes and dtypes the result takes; extra: keys of other tensors to read
    whole where present (the ring buffer's). mesh None: one process, rows [0, n).
    """
    lo, hi = (0, n) if mesh is None else mesh.latent_range(n)
    path = Path(path)
    if not is_sharded(path):
        return _load_single(path, like, lo, hi, extra)
    reader = dcp.FileSystemReader(str(path / "dcp"))
    stored = reader.read_metadata().state_dict_metadata
    state: dict[str, Any] = {}
    for key, t in like.items():
        if key not in stored:
            raise ValueError(f"checkpoint {path} has no tensor {key!r}")
        if is_row_key(key):
            rows = torch.empty_like(_as_rows(key, t, hi - lo))
            state[key] = rows if mesh is None else _dtensor(rows, mesh, n)
        else:
            state[key] = torch.empty_like(t)
    for key in (key for key in extra if key in stored):  # extra tensors a checkpoint may lack
        state[key] = torch.empty(tuple(stored[key].size), dtype=stored[key].properties.dtype)
    with warnings.catch_warnings():  # one process reading on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=mesh is None)
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
                    if is_row_key(key):
                        rows = handle.get_slice(key)[lo:hi]
                        out[key] = torch.cat([rows, like[key][hi - lo :]]) if key in STATISTICS else rows
                    else:
                        out[key] = handle.get_tensor(key)
    missing = set(like) - set(out)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}")
    return out
