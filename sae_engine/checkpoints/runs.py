"""Reading a trained run: the model of its latest checkpoint, in either checkpoint layout.

A single-process checkpoint holds ``model.safetensors``; a sharded one holds ``dcp/`` (written
by torch.distributed.checkpoint, each rank its rows) or ``orbax/`` (a JAX mesh run), read here
whole in one process. The peer formats, the native export of a single-process run and analysis
(:func:`load_trained_sae`) read runs through :func:`load_run_weights`; the native export streams
a sharded run instead (:mod:`sae_engine.checkpoints.dcp_export`, :mod:`sae_engine.checkpoints.orbax`),
never holding it whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .single import FORMAT_VERSION, MODEL_KEYS_PREFIXES, latest_checkpoint

if TYPE_CHECKING:
    from ..training.torch_backend import TorchSAE


class RunError(ValueError):
    """A run folder that holds no readable checkpoint."""


@dataclass
class RunWeights:
    """What analysis and export need of a run: model tensors (checkpoint keys), config, step."""

    tensors: dict[str, torch.Tensor]  # param.* and the normalisation buffers, whole, on the CPU
    config: dict[str, Any]
    step: int


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path / 'meta.json'}: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise RunError(f"checkpoint {path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Checkpoint ``path``'s model file, or its sharded model tensors with every rank's rows joined."""
    if (path / "orbax").is_dir():
        from .orbax import model_tensors

        return model_tensors(path)
    if not (path / "dcp").is_dir():
        return load_file(str(path / "model.safetensors"))
    from torch.distributed.checkpoint.api import CheckpointException

    from .dcp_export import read_sharded

    try:
        return read_sharded(path)[0]
    except CheckpointException as error:  # a BaseException, which `except Exception` would miss
        raise ValueError(str(error)) from None


def load_run_weights(run_dir: str | Path) -> RunWeights:
    """The model tensors of a run's latest checkpoint (single-process or sharded), whole, on the CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise RunError(f"{run_dir} holds no checkpoint (no {run_dir / 'checkpoints' / 'latest'})")
    meta = _read_meta(path)
    try:
        tensors = _model_tensors(path)
    except (OSError, RuntimeError, SafetensorError, ValueError) as error:
        raise RunError(f"cannot read the model of checkpoint {path}: {error}") from error
    model = {name: t for name, t in tensors.items() if name.startswith(MODEL_KEYS_PREFIXES)}
    return RunWeights(model, meta["config"], int(meta["step"]))


def load_trained_sae(run_dir: str | Path) -> TorchSAE:
    """A run's latest checkpoint as a TorchSAE on the CPU in fp32 (analysis reads exact values).

    The model only: parameters and normalisation scales come from the run; optimizer moments and
    firing statistics are fresh (resume training through the Trainer, which reads them all).
    """
    from ..config import RunConfig
    from ..training.torch_backend import TorchSAE

    weights = load_run_weights(run_dir)
    config = RunConfig.from_dict(weights.config, origin=f"{run_dir} (latest checkpoint)")
    config.train.precision = "fp32"
    sae = TorchSAE(config, torch.device("cpu"))
    state = sae.state_tensors()
    missing = sorted(name for name in state if name.startswith(MODEL_KEYS_PREFIXES) and name not in weights.tensors)
    if missing:
        raise RunError(f"the latest checkpoint of {run_dir} lacks {missing}")
    sae.load_state_tensors({**state, **weights.tensors}, adam_count=0, aux_active=False)
    return sae
