"""Checkpoints of a JAX mesh run with orbax, restored onto any mesh, one process or either backend.

Layout of ``<run>/checkpoints/step_000001234/``:
    orbax/             orbax's checkpoint of the backend's arrays as placed (``JaxSAE.state_arrays``:
                       per-latent arrays split over ``latent`` and padded to a multiple of L rows,
                       each shard written by the process holding it)
    ring.safetensors   the ring buffer's state tensors (unserved vectors and positions, RNG)
    meta.json          config, step, counters and mesh, as any checkpoint
The folder is written under a temporary name and renamed, then ``latest`` is replaced: a crash
leaves the previous checkpoint intact. On restore orbax reads each device's rows for the mesh at
hand (another L pads or trims the zero padding rows); one process reads the arrays whole with n
rows, as torch tensors under the checkpoint names every backend loads.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .single import FORMAT_VERSION, MODEL_KEYS_PREFIXES, point_latest
from ..training.jax_backend import COUNTERS, JaxSAE, is_row_key
from .stream_safetensors import write_streamed
from ..parallel.jax_mesh import MeshLayout

ORBAX, RING = "orbax", "ring.safetensors"
ROWS_PER_CHUNK = 1 << 16  # rows read at a time when streaming an export


def is_orbax(path: Path) -> bool:
    return (Path(path) / ORBAX).is_dir()


def save_orbax(run_dir: Path, step: int, arrays: dict[str, jax.Array], ring: dict[str, torch.Tensor],
               meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` of a JAX mesh run (see the module docstring)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        ocp.PyTreeCheckpointer().save((tmp / ORBAX).absolute(), arrays)
        save_file({key: t.contiguous() for key, t in ring.items()}, str(tmp / RING))
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    point_latest(final, keep)
    return final


def _stored(path: Path) -> dict[str, Any]:
    """Orbax's metadata of every stored array, by key."""
    return dict(ocp.PyTreeCheckpointer().metadata((Path(path) / ORBAX).absolute()).item_metadata.tree)


def restore_on_mesh(path: Path, backend: JaxSAE, layout: MeshLayout, adam_count: int, aux_active: bool) -> None:
    """Load an orbax checkpoint into ``backend`` laid out by ``layout``: each device reads its rows."""
    like = backend.state_arrays()
    missing = sorted(set(like) - set(_stored(path)))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    args = {key: ocp.ArrayRestoreArgs(sharding=layout.sharding(is_row_key(key)), global_shape=a.shape,
                                      dtype=a.dtype, strict=False)
            for key, a in like.items()}
    arrays = ocp.PyTreeCheckpointer().restore(
        (Path(path) / ORBAX).absolute(),
        args=ocp.args.PyTreeRestore(item={key: 0 for key in like}, restore_args=args, partial_restore=True))
    backend.load_state_arrays(arrays, adam_count, aux_active)


def read_tensors(path: Path, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """An orbax checkpoint's arrays (``keys``, or all) whole in this process as torch tensors with
    the names, n rows and dtypes of ``state_tensors``, with the ring buffer's."""
    n = json.loads((Path(path) / "meta.json").read_text())["config"]["model"]["n_latents"]
    stored = _stored(path)
    keys = list(stored) if keys is None else keys
    missing = sorted(set(keys) - set(stored))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    arrays = ocp.PyTreeCheckpointer().restore(
        (Path(path) / ORBAX).absolute(),
        args=ocp.args.PyTreeRestore(item={key: 0 for key in keys}, partial_restore=True,
                                    restore_args={key: ocp.RestoreArgs(restore_type=np.ndarray) for key in keys}))
    out = {}
    for key, a in arrays.items():
        t = torch.from_numpy(np.array(a))
        if is_row_key(key):
            t = t[:n]
        out[key] = t.long() if key.removeprefix("buffer.") in COUNTERS else t
    return out


def model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors (``MODEL_KEYS_PREFIXES``) of an orbax checkpoint, whole."""
    return read_tensors(path, [key for key in _stored(path) if key.startswith(MODEL_KEYS_PREFIXES)])


def read_rows(path: Path, like: dict[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
    """A torch latent rank's tensors from an orbax checkpoint: rows [lo, hi) of the per-latent
    ones, read alone; the firing statistics' rows with ``like``'s absorbing slot (as
    ``parallel.checkpoint.load_rows``); the rest whole. like: the rank's state tensors."""
    folder = Path(path) / ORBAX
    stored = _stored(path)
    missing = sorted(set(like) - set(stored))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing}")
    out = {}
    for key, t in like.items():
        view = _open_array(folder, key)
        counter = key.removeprefix("buffer.") in COUNTERS
        if is_row_key(key) or counter:
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
    n = json.loads((Path(path) / "meta.json").read_text())["config"]["model"]["n_latents"]
    views = {key: _open_array(folder, key) for key in sorted(_stored(path)) if key.startswith(MODEL_KEYS_PREFIXES)}

    def shape(key: str) -> tuple[int, ...]:
        full = tuple(views[key].shape)
        return (n,) + full[1:] if is_row_key(key) else full

    def chunks(key: str) -> Iterator[torch.Tensor]:
        rows = shape(key)[0] if shape(key) else 0
        if not rows:
            yield torch.from_numpy(np.array(views[key].read().result()))
            return
        for lo in range(0, rows, ROWS_PER_CHUNK):
            yield torch.from_numpy(np.array(views[key][lo : min(lo + ROWS_PER_CHUNK, rows)].read().result()))

    entries = [(key, torch.from_numpy(np.zeros(0, views[key].dtype.numpy_dtype)).dtype, shape(key)) for key in views]
    return write_streamed(out, entries, chunks, metadata)
