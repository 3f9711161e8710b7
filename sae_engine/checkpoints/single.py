"""Single-process checkpoints: safetensors files plus ``meta.json``, readable by either backend.

Layout of ``<run>/checkpoints/step_000001234/``:
    model.safetensors   the parameters and normalisation scales (what analysis needs)
    state.safetensors   optimizer moments, latent statistics, the ring buffer's unserved vectors
                        and their stream positions
    meta.json           config, step, tokens seen, RNG and buffer counters, file sizes
Written and committed as every layout is (``folder.writing`` / ``folder.commit``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .folder import commit, writing
from .keys import is_model_key
from .meta import CheckpointError, read_meta, write_meta


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` of a one-process run and point ``latest`` at it; keep the newest
    ``keep``. Raises CheckpointWriteError (the previous checkpoint kept) when it cannot."""
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    with writing(run_dir, step) as tmp:
        save_file({name: t for name, t in cpu.items() if is_model_key(name)}, str(tmp / "model.safetensors"))
        save_file({name: t for name, t in cpu.items() if not is_model_key(name)}, str(tmp / "state.safetensors"))
        write_meta(tmp, meta)
    return commit(run_dir, step, keep)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (model and state together) and meta of a single-process checkpoint folder."""
    path = Path(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path / "model.safetensors"))
        tensors.update(load_file(str(path / "state.safetensors")))
    except (OSError, SafetensorError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    return tensors, meta


def read_model_file(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a single-process checkpoint folder."""
    try:
        return load_file(str(Path(path) / "model.safetensors"))
    except (OSError, SafetensorError, ValueError) as error:
        raise CheckpointError(f"cannot read the model of checkpoint {path}: {error}") from None
