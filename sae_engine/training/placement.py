"""Where a run trains: the placement that ``train`` hands to the ``Trainer``.

A placement owns everything that depends on how a run is laid out: the device batches live on,
what "auto" precision is decided for, which process writes shared files, what each process
reads of the data, the backend (plain or sharded), how checkpoints are written and read back,
and agreement between processes. The Trainer calls only this protocol and never asks which
placement it has, as torchtitan's trainer calls one ``parallelize_fn``.

Three placements: ``OneProcess`` (here) and, applied from outside by ``sae_engine.parallel``, a
torch.distributed mesh of processes and a JAX mesh of one process's devices. ``placement_for``
finds the one a config asks for by name, so this package imports nothing of ``parallel``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoints.keys import RING_KEYS
from ..config import ConfigError, RunConfig
from ..data.sources import ActivationSource
from .backend import SAEBackend
from .buffer import RingBuffer


class Feed(Protocol):
    """What a placement's feed serves: batches [b, d] of this process's rows, resumable."""

    def next_batch(self, batch_size: int, drop_last: bool = True) -> torch.Tensor | None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Placement(Protocol):
    """How one run is laid out; see the module docstring."""

    device: torch.device  # where this process's batches live
    compute_device_type: str  # what "auto" precision is decided for ("cpu" or "cuda")
    is_main: bool  # the process that writes shared files (config.json, metrics.jsonl, plots)

    def feed(self, source: ActivationSource, capacity: int, dtype: torch.dtype, seed: int) -> Feed:
        """What this process trains on: its rows of each global batch, from ``source``."""
        ...

    def backend(self, config: RunConfig, precision: str) -> SAEBackend:
        """The run's backend computing in ``precision`` ("bf16" or "fp32"), laid out here."""
        ...

    def save(self, run_dir: Path, step: int, backend: SAEBackend, ring: dict[str, torch.Tensor],
             meta: dict[str, Any], keep: int) -> Path:
        """Write checkpoint ``step`` (``ring``: the feed's tensors); CheckpointWriteError if it cannot."""
        ...

    def restore(self, path: Path, backend: SAEBackend, config: RunConfig, adam_count: int,
                aux_active: bool) -> dict[str, torch.Tensor]:
        """Load checkpoint ``path`` of any layout into ``backend``; returns the feed's tensors
        (``buffer.*``) where stored; CheckpointError if it cannot be read."""
        ...

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds in any process (every process then takes the same branch)."""
        ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_backend(config: RunConfig, device: torch.device, precision: str | None = None) -> SAEBackend:
    """The plain backend ``train.backend`` names, computing in ``precision`` ("bf16" or "fp32";
    None = ``train.precision`` decided for the device)."""
    if config.train.backend == "torch":
        from .torch_backend import TorchSAE

        return TorchSAE(config, device, precision)
    if device.type != "cpu":
        raise ConfigError("train.backend = 'jax' runs where JAX runs; use train.device = 'cpu' here, "
                          "or a JAX build with GPU support and the default device")
    from .jax_backend import JaxSAE

    return JaxSAE(config, precision)


class OneProcess:
    """One plain process: no collectives, single-process checkpoints (reads every layout)."""

    is_main = True

    def __init__(self, config: RunConfig) -> None:
        self.device = resolve_device(config.train.device)
        self.compute_device_type = self.device.type

    def feed(self, source: ActivationSource, capacity: int, dtype: torch.dtype, seed: int) -> RingBuffer:
        return RingBuffer(source, capacity, dtype=dtype, device=self.device, seed=seed)

    def backend(self, config: RunConfig, precision: str) -> SAEBackend:
        return make_backend(config, self.device, precision)

    def save(self, run_dir: Path, step: int, backend: SAEBackend, ring: dict[str, torch.Tensor],
             meta: dict[str, Any], keep: int) -> Path:
        from ..checkpoints.single import save_checkpoint

        return save_checkpoint(run_dir, step, {**backend.state_tensors(), **ring}, meta, keep)

    def restore(self, path: Path, backend: SAEBackend, config: RunConfig, adam_count: int,
                aux_active: bool) -> dict[str, torch.Tensor]:
        from ..checkpoints.state import read_state

        tensors = read_state(path, backend.state_tensors(), config.model.n_latents)
        backend.load_state_tensors(tensors, adam_count, aux_active)
        return {key: t for key, t in tensors.items() if key in RING_KEYS}

    def any(self, flag: bool) -> bool:
        return flag


# train.backend -> "module:function" building the placement [parallel] asks for; imported when used.
PLACEMENTS = {
    "torch": "sae_engine.parallel.placements:torch_placement",
    "jax": "sae_engine.parallel.placements:jax_placement",
}


def placement_for(config: RunConfig) -> Placement:
    """The placement ``[parallel]`` and ``train.backend`` ask for (``OneProcess`` for 1 x 1 outside
    torchrun); ConfigError, before anything is written, when it cannot be built."""
    p = config.parallel
    if config.train.batch_size % p.data:
        raise ConfigError(f"train.batch_size = {config.train.batch_size} does not split over parallel.data = "
                          f"{p.data} ranks")
    module, name = PLACEMENTS[config.train.backend].split(":")
    return getattr(importlib.import_module(module), name)(config)
