"""Reading a trained run: the model of its latest checkpoint, in any checkpoint layout, whole.

The peer formats, the native export of a single-process run and analysis
(``sae_engine.training.trained.load_trained_sae``) read runs through :func:`load_run_weights`;
the native export streams sharded layouts instead (``checkpoints.export``), never holding them
whole. Reading is strict: a latest checkpoint that cannot be read is an error naming it (a run
that trains on resumes from an earlier one instead: ``folder.newest_readable``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .folder import latest_checkpoint
from .keys import is_model_key
from .meta import DCP, ORBAX, SINGLE, CheckpointError, layout_of, read_meta, verify


class RunError(ValueError):
    """A run folder that holds no readable checkpoint."""


@dataclass
class RunWeights:
    """What analysis and export need of a run: model tensors (checkpoint keys), config, step."""

    tensors: dict[str, torch.Tensor]  # param.* and the normalisation buffers, whole, on the CPU
    config: dict[str, Any]
    step: int


def _single(path: Path) -> dict[str, torch.Tensor]:
    from .single import read_model_file

    return read_model_file(path)


def _dcp(path: Path) -> dict[str, torch.Tensor]:
    from .dcp_export import read_sharded

    return read_sharded(path)


def _orbax(path: Path) -> dict[str, torch.Tensor]:
    from .orbax import model_tensors

    return model_tensors(path)


MODEL_READERS: dict[str, Callable[[Path], dict[str, torch.Tensor]]] = {SINGLE: _single, DCP: _dcp, ORBAX: _orbax}


def latest_of(run_dir: str | Path) -> Path:
    """The latest checkpoint folder of a run; RunError when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    try:
        path = latest_checkpoint(run_dir)
    except CheckpointError as error:
        raise RunError(str(error)) from None
    if path is None:
        raise RunError(f"{run_dir} holds no checkpoint (no {run_dir / 'checkpoints' / 'latest'})")
    return path


def load_run_weights(run_dir: str | Path) -> RunWeights:
    """The model tensors of a run's latest checkpoint (any layout), whole, on the CPU."""
    path = latest_of(run_dir)
    try:
        meta = read_meta(path)
    except CheckpointError as error:
        raise RunError(str(error)) from None
    why = verify(path)
    try:
        if why is not None:
            raise CheckpointError(why)
        tensors = MODEL_READERS[layout_of(path)](path)
    except CheckpointError as error:
        raise RunError(f"cannot read the model of checkpoint {path}: {error}") from None
    return RunWeights({name: t for name, t in tensors.items() if is_model_key(name)}, meta["config"], int(meta["step"]))
