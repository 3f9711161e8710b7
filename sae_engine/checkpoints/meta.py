"""What one checkpoint folder holds: its layout, its ``meta.json``, and whether it is readable.

Every checkpoint folder has a ``meta.json`` (config, step, counters, the buffer's state, and
``files``: the size in bytes of every other file in the folder) beside the tensors of one of
three layouts:

    single   ``model.safetensors`` + ``state.safetensors`` (one process)
    dcp      ``dcp/``: torch.distributed.checkpoint, each rank its rows
    orbax    ``orbax/`` + ``ring.safetensors``: a JAX mesh run

This is the one module that reads ``meta.json`` and the one that tells the layouts apart.
``verify`` checks a folder against the sizes its meta records (a truncated copy or a half
written file is caught without reading the tensors); folders written before sizes were
recorded get their safetensors files' headers checked against their lengths instead.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
META = "meta.json"
SINGLE, DCP, ORBAX = "single", "dcp", "orbax"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names it and why."""


def layout_of(path: str | Path) -> str:
    """The layout of checkpoint folder ``path``: SINGLE, DCP or ORBAX."""
    path = Path(path)
    if (path / DCP).is_dir():
        return DCP
    if (path / ORBAX).is_dir():
        return ORBAX
    if (path / "model.safetensors").is_file():
        return SINGLE
    raise CheckpointError(f"checkpoint {path} holds no model.safetensors, dcp/ or orbax/")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta.json`` of checkpoint folder ``path``, its format version checked."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file}: {error}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {Path(path)} has format version {version}, expected {FORMAT_VERSION}")
    return meta


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``meta.json`` into a checkpoint folder whose other files are all written, recording
    their sizes (``verify`` reads them back), and sync it."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != META}
    payload = {**meta, "format_version": FORMAT_VERSION, "files": files}
    with open(folder / META, "w") as handle:
        handle.write(json.dumps(payload, indent=2, sort_keys=True))
        handle.flush()
        os.fsync(handle.fileno())


def verify(path: str | Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be read, or None when it looks complete."""
    path = Path(path)
    try:
        meta = read_meta(path)
        layout_of(path)
    except CheckpointError as error:
        return str(error)
    files = meta.get("files")
    if files is None:  # written before sizes were recorded
        return next(filter(None, (_safetensors_damage(p) for p in sorted(path.rglob("*.safetensors")))), None)
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, its meta.json says {size}"
    return None


def _safetensors_damage(file: Path) -> str | None:
    """Why a safetensors file is incomplete (its header promises more bytes than it has), or None."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len)) if 8 + header_len <= size else None
    except (OSError, ValueError, struct.error) as error:
        return f"{file} is not a readable safetensors file: {error}"
    if header is None:
        return f"{file} is cut short ({size} bytes, its header alone needs {8 + header_len})"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"{file} has {size} bytes, its header says {8 + header_len + end}"
    return None
