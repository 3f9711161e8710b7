"""Export a run's weights: one file, or a peer library's format (see ``sae_engine.interop``).

The native format is the latest checkpoint's ``model.safetensors`` as one file: the same keys
(``param.*``, ``buffer.in_scale``, ``buffer.out_scale``, ``buffer.batchtopk_threshold``), with
the run's config as JSON in the file's metadata (key ``config``) and the step (key ``step``).
A sharded run is streamed into that file shard by shard (:mod:`sae_engine.checkpoints.dcp_export`); the
peer formats read runs whole through :func:`sae_engine.checkpoints.runs.load_run_weights`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..atomic import atomic_path
from .single import latest_checkpoint
from .runs import load_run_weights


class ExportError(ValueError):
    """A run or model that cannot be exported as asked; nothing was written."""


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


def export_native(run_dir: str | Path, out: str | Path) -> Path:
    """The latest checkpoint's model tensors as one safetensors file at ``out``."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; the native export is one file (e.g. {out / 'model.safetensors'})")
    from .dcp_export import export_if_sharded

    if export_if_sharded(run_dir, out):  # a sharded run, streamed shard by shard
        return out
    checkpoint = latest_checkpoint(Path(run_dir)) if Path(run_dir).is_dir() else None
    if checkpoint is not None and (checkpoint / "orbax").is_dir():  # a JAX mesh run, streamed likewise
        from .orbax import export_orbax

        meta = json.loads((checkpoint / "meta.json").read_text())
        return export_orbax(checkpoint, out, _file_metadata(meta["config"], meta["step"]))
    weights = load_run_weights(run_dir)
    write_safetensors_atomic(weights.tensors, out, _file_metadata(weights.config, weights.step))
    return out


def _file_metadata(config: dict, step: int) -> dict[str, str]:
    """The native export's file metadata: the run's config as JSON and its step."""
    return {"config": json.dumps(config, sort_keys=True), "step": str(step)}
