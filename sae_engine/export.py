"""Export a run's weights: one file, or a peer library's format (see ``sae_engine.interop``).

The native format is the latest checkpoint's ``model.safetensors`` as one file: the same keys
(``param.*``, ``buffer.in_scale``, ``buffer.out_scale``, ``buffer.batchtopk_threshold``), with
the run's config as JSON in the file's metadata (key ``config``) and the step (key ``step``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic import atomic_path
from .checkpoint import MODEL_KEYS_PREFIXES, latest_checkpoint, load_checkpoint


class ExportError(ValueError):
    """A run or model that cannot be exported as asked; nothing was written."""


@dataclass
class RunWeights:
    """What analysis and export need of a run: model tensors (checkpoint keys), config, step."""

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    step: int


def load_run_weights(run_dir: str | Path) -> RunWeights:
    """The model tensors of a run's latest checkpoint, whole, on the CPU.

    One place reads a run's weights for export, so runs saved in other layouts (sharded
    checkpoints) plug in here and every export format follows.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise ExportError(f"{run_dir} holds no checkpoint (no {run_dir / 'checkpoints' / 'latest'})")
    tensors, meta = load_checkpoint(path)
    model = {name: t for name, t in tensors.items() if name.startswith(MODEL_KEYS_PREFIXES)}
    return RunWeights(model, meta["config"], int(meta["step"]))


def write_safetensors_atomic(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp), metadata=metadata)


def export_native(run_dir: str | Path, out: str | Path) -> Path:
    """The latest checkpoint's model tensors as one safetensors file at ``out``."""
    weights = load_run_weights(run_dir)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; the native export is one file (e.g. {out / 'model.safetensors'})")
    write_safetensors_atomic(weights.tensors, out, {"config": json.dumps(weights.config, sort_keys=True),
                                                    "step": str(weights.step)})
    return out
