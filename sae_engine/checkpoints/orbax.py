"""Checkpoints of a JAX mesh run with orbax, restored onto any mesh, one process or either backend.

Layout of ``<run>/checkpoints/step_000001234/``:
    orbax/             orbax's checkpoint of the backend's arrays as placed (``JaxSAE.state_arrays``:
                       per-latent arrays split over ``latent`` and padded to a multiple of L rows,
                       each shard written by the process holding it)
    ring.safetensors   the ring buffer's state tensors (unserved vectors and positions, RNG)
    meta.json          config, step, counters and mesh, as any checkpoint
Written and committed as every layout is (``folder.writing`` / ``folder.commit``). On restore orbax reads each device's rows for the mesh at
hand (another L pads or trims the zero padding rows); one process reads the arrays whole with n
rows, as torch tensors under the checkpoint names every backend loads.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import torch
from safetensors.torch import load_file, save_file

from .folder import commit, writing
from .keys import STATISTICS, is_model_key, is_row_param
from .meta import ORBAX, CheckpointError, read_meta, write_meta
from .stream_safetensors import write_streamed

RING = "ring.safetensors"
ROWS_PER_CHUNK = 1 << 16  # rows read at a time when streaming an export


def save_orbax(run_dir: Path, step: int, arrays: dict[str, jax.Array], ring: dict[str, torch.Tensor],
               meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` of a JAX mesh run (see the module docstring); raises
    CheckpointWriteError (the previous checkpoint kept) when it cannot."""
    with writing(run_dir, step) as tmp:
        ocp.PyTreeCheckpointer().save((tmp / ORBAX).absolute(), arrays)
        save_file({key: t.contiguous() for key, t in ring.items()}, str(tmp / RING))
        write_meta(tmp, meta)
    return commit(run_dir, step, keep)


def _stored(path: Path) -> dict[str, Any]:
    """Orbax's metadata of every stored array, by key."""
    return dict(ocp.PyTreeCheckpointer().metadata((Path(path) / ORBAX).absolute()).item_metadata.tree)


def _is_counter(key: str) -> bool:
    """The firing statistics: int32 in JAX, int64 in checkpoints' torch tensors."""
    return key in STATISTICS


def restore_arrays(path: Path, like: dict[str, jax.Array], sharding: Callable[[str], Any]) -> dict[str, jax.Array]:
    """The arrays of an orbax checkpoint placed as ``sharding(key)`` says, with ``like``'s global
    shapes and dtypes (another number of padding rows is padded or trimmed): each device reads
    its rows."""
    missing = sorted(set(like) - set(_stored(path)))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    args = {key: ocp.ArrayRestoreArgs(sharding=sharding(key), global_shape=a.shape, dtype=a.dtype, strict=False)
            for key, a in like.items()}
    return ocp.PyTreeCheckpointer().restore(
        (Path(path) / ORBAX).absolute(),
        args=ocp.args.PyTreeRestore(item={key: 0 for key in like}, restore_args=args, partial_restore=True))


def read_tensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """An orbax checkpoint's arrays (``keys``, or all) whole in this process as torch tensors with
    the names, n rows and dtypes of ``state_tensors``, with the ring buffer's."""
    n = read_meta(path)["config"]["model"]["n_latents"]
    stored = _stored(path)
    keys = list(stored) if keys is None else keys
    missing = sorted(set(keys) - set(stored))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    arrays = ocp.PyTreeCheckpointer().restore(
        (Path(path) / ORBAX).absolute(),
        args=ocp.args.PyTreeRestore(item={key: 0 for key in keys}, partial_restore=True,
                                    restore_args={key: ocp.RestoreArgs(restore_type=np.ndarray) for key in keys}))
    out = {}
    for key, a in arrays.items():
        t = torch.from_numpy(np.array(a))
        if is_row_param(key):
            t = t[:n]
        out[key] = t.long() if _is_counter(key) else t
    return out


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors (``keys.is_model_key``) of an orbax checkpoint, whole."""
    return read_tensors(path, [key for key in _stored(path) if is_model_key(key)])


def read_rows(path: Path, like: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """A torch latent rank's tensors from an orbax checkpoint: rows [lo, hi) of the per-latent
    ones, read alone; the firing statistics' rows with ``like``'s absorbing slot (as
    ``checkpoints.dcp.load_rows``); the rest whole. like: the rank's state tensors."""
    folder = Path(path) / ORBAX
    stored = _stored(path)
    missing = sorted(set(like) - set(stored))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    out = {}
    for key, t in like.items():
        view = _open_array(folder, key)
        counter = _is_counter(key)
        if is_row_param(key) or counter:
            rows = torch.from_numpy(np.array(view[lo:hi].read().result()))
            out[key] = torch.cat([rows.long(), t[hi - lo :]]) if counter else rows
        else:
            out[key] = torch.from_numpy(np.array(view.read().result()))
    return out


def read_ring(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / RING))


def _open_array(folder: Path, key: str):
    """A lazily read tensorstore view of one stored array (orbax writes zarr arrays, by default
    inside one OCDBT key-value store)."""
    import tensorstore as ts

    flags = json.loads((folder / "_METADATA").read_text())
    kvstore = ({"driver": "ocdbt", "base": f"file://{folder.absolute()}/", "path": f"{key}/"}
               if flags.get("use_ocdbt", True) else {"driver": "file", "path": f"{folder.absolute()}/{key}/"})
    return ts.open({"driver": "zarr3" if flags.get("use_zarr3") else "zarr", "kvstore": kvstore}, open=True).result()


def export_orbax(path: Path, out: Path, metadata: dict[str, str]) -> Path:
    """The model tensors of an orbax checkpoint as one ``model.safetensors``-format file, streamed
    ``ROWS_PER_CHUNK`` rows at a time (padding rows left out)."""
    folder = Path(path) / ORBAX
    n = read_meta(path)["config"]["model"]["n_latents"]
    views = {key: _open_array(folder, key) for key in sorted(_stored(path)) if is_model_key(key)}

    def shape(key: str) -> tuple[int, ...]:
        full = tuple(views[key].shape)
        return (n,) + full[1:] if is_row_param(key) else full

    def chunks(key: str) -> Iterator[torch.Tensor]:
        rows = shape(key)[0] if shape(key) else 0
        if not rows:
            yield torch.from_numpy(np.array(views[key].read().result()))
            return
        for lo in range(0, rows, ROWS_PER_CHUNK):
            yield torch.from_numpy(np.array(views[key][lo : min(lo + ROWS_PER_CHUNK, rows)].read().result()))

    entries = [(key, torch.from_numpy(np.zeros(0, views[key].dtype.numpy_dtype)).dtype, shape(key)) for key in views]
    return write_streamed(out, entries, chunks, metadata)
