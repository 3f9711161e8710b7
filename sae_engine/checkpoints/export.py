"""Export a run's weights: one file, or a peer library's format (see ``sae_engine.interop``).

The native format is the latest checkpoint's ``model.safetensors`` as one file: the same keys
(``param.*``, ``buffer.in_scale``, ``buffer.out_scale``, ``buffer.batchtopk_threshold``), with
the run's config as JSON in the file's metadata (key ``config``) and the step (key ``step``).
Sharded layouts (DCP, orbax) are streamed into that file block by block, never held whole; the
peer formats read runs whole through :func:`sae_engine.checkpoints.runs.load_run_weights`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from .meta import DCP, ORBAX, layout_of, read_meta, verify
from .runs import RunError, latest_of, load_run_weights


class ExportError(ValueError):
    """A run or model that cannot be exported as asked; nothing was written."""


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


def _stream(path: Path, out: Path, metadata: dict[str, str]) -> Path:
    """A sharded checkpoint's model streamed into one file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if layout_of(path) == DCP:
        from .dcp_export import export_sharded

        return export_sharded(path, out, metadata)
    from .orbax import export_orbax

    return export_orbax(path, out, metadata)


def export_native(run_dir: str | Path, out: str | Path) -> Path:
    """The latest checkpoint's model tensors as one safetensors file at ``out``."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; the native export is one file (e.g. {out / 'model.safetensors'})")
    path = latest_of(run_dir)
    if layout_of(path) in (DCP, ORBAX):
        why = verify(path)
        if why is not None:
            raise RunError(f"cannot read the model of checkpoint {path}: {why}")
        meta = read_meta(path)
        return _stream(path, out, _file_metadata(meta["config"], meta["step"]))
    weights = load_run_weights(run_dir)
    write_safetensors_atomic(weights.tensors, out, _file_metadata(weights.config, weights.step))
    return out


def _file_metadata(config: dict, step: int) -> dict[str, str]:
    """The native export's file metadata: the run's config as JSON and its step."""
    return {"config": json.dumps(config, sort_keys=True), "step": str(step)}
