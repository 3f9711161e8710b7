"""A trained run as a TorchSAE, for analysis."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoints.keys import is_model_key
from ..checkpoints.runs import RunError, load_run_weights
from ..config import RunConfig
from .torch_backend import TorchSAE


def load_trained_sae(run_dir: str | Path) -> TorchSAE:
    """A run's latest checkpoint as a TorchSAE on the CPU in fp32 (analysis reads exact values).

    The model only: parameters and normalisation scales come from the run; optimizer moments and
    firing statistics are fresh (resume training through the Trainer, which reads them all).
    """
    weights = load_run_weights(run_dir)
    config = RunConfig.from_dict(weights.config, origin=f"{run_dir} (latest checkpoint)")
    config.train.precision = "fp32"
    sae = TorchSAE(config, torch.device("cpu"))
    state = sae.state_tensors()
    missing = sorted(name for name in state if is_model_key(name) and name not in weights.tensors)
    if missing:
        raise RunError(f"the latest checkpoint of {run_dir} lacks {missing}")
    sae.load_state_tensors({**state, **weights.tensors}, adam_count=0, aux_active=False)
    return sae
