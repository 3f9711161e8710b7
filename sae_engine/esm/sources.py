"""ESM2 activations as training sources: ``esm`` (an activation store) and ``esm_live``.

Both read the ``[data.esm]`` table (:class:`EsmOptions`) and are registered with
:mod:`sae_engine.data.registry` by name, so the trainer never imports this package. ``esm`` opens the
store, extracting it first when it is missing or incomplete; ``esm_live`` runs ESM2 in the ring
buffer's producer thread with nothing on disk. Checking the options imports no model code;
fair-esm is needed only to build a source that runs the model. ESM2 computes in the run's
``train.precision_resolved`` when the config records one (a resumed run's), else in
``train.precision`` decided for the device ESM2 runs on (the CPU).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_path
from ..config import ConfigError
from ..data.registry import SourceSpec
from ..data.sources import ActivationSource, PairedSource

if TYPE_CHECKING:
    from ..config import RunConfig


@dataclass
class EsmOptions:
    """``[data.esm]``: which proteins, which model, which layers."""

    store: str = ""  # source = "esm": an activation store (made by `sae-engine extract`, or here)
    layer: int = 4  # ESM2 layer of the input vectors
    target_layer: int | None = None  # transcoders: layer of the targets
    fasta: str = ""  # proteins to extract from ("~" expands); needed by esm_live, and by esm without a store
    max_proteins: int | None = None  # only the first N proteins of the FASTA
    model: str = "default"  # model spec (see sae_engine.esm.models)
    pool: str = "none"  # "none" (residues), "mean" or "max" (one vector per protein)

    def layers(self, transcoder: bool) -> list[int]:
        return [self.layer] + ([self.target_layer] if transcoder else [])


def _check(options: EsmOptions, config: RunConfig, live: bool) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"data.esm.{key} = {getattr(options, key)!r}: {why}")

    if live and not options.fasta:
        fail("fasta", "source = 'esm_live' needs a FASTA file")
    if not live and not options.store:
        fail("store", "source = 'esm' needs an activation store folder")
    if config.model.is_transcoder and options.target_layer is None:
        fail("target_layer", "an ESM2 transcoder needs the layer of its targets")
    if options.pool not in ("none", "mean", "max"):
        fail("pool", "must be one of ['none', 'mean', 'max']")
    if options.max_proteins is not None and options.max_proteins < 1:
        fail("max_proteins", "must be a positive integer or absent")


def _fasta_subset(options: EsmOptions, out_dir: str) -> Path | None:
    """The FASTA to extract from: data.esm.fasta, or a copy of its first data.esm.max_proteins records."""
    if not options.fasta:
        return None
    fasta = Path(options.fasta).expanduser()
    if options.max_proteins is None:
        return fasta
    from .fasta import read_fasta, write_fasta

    subset = Path(options.store or out_dir).expanduser().with_suffix(".input.fasta")
    if not subset.exists():
        subset.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(subset) as tmp:
            write_fasta(itertools.islice(read_fasta(fasta), options.max_proteins), tmp)
    return subset


def _precision(config: RunConfig) -> str:
    return config.train.precision_resolved or config.train.precision


def _build_store(options: EsmOptions, config: RunConfig) -> ActivationSource:
    from .extract import ensure_store
    from .store import StoreSource

    m = config.model
    ensure_store(options.store, layers=options.layers(m.is_transcoder), fasta=_fasta_subset(options, config.train.out_dir),
                 model=options.model, pool=options.pool, precision=_precision(config), progress=config.train.progress)
    inputs = StoreSource(options.store, options.layer)
    if inputs.d != m.d_in:
        raise ConfigError(f"data.esm.store: layer {options.layer} vectors have d={inputs.d} but model.d_in = {m.d_in}")
    if not m.is_transcoder:
        return inputs
    targets = StoreSource(options.store, options.target_layer)
    if targets.d != m.d_out:
        raise ConfigError(f"data.esm.store: layer {options.target_layer} vectors have d={targets.d} "
                          f"but model.d_out = {m.d_out}")
    return PairedSource(inputs, targets)


def _build_live(options: EsmOptions, config: RunConfig) -> ActivationSource:
    from .live import LiveSource
    from .models import load_model

    m = config.model
    layers = options.layers(m.is_transcoder)
    source = LiveSource(_fasta_subset(options, config.train.out_dir), load_model(options.model), layers, pool=options.pool,
                        precision=_precision(config))
    width = source.d // len(layers)
    if width != m.d_in or (m.is_transcoder and width != m.d_out):
        raise ConfigError(f"data.esm.model gives d={width} vectors but model.d_in = {m.d_in}"
                          + (f", model.d_out = {m.d_out}" if m.is_transcoder else ""))
    return source


STORE = SourceSpec("esm", EsmOptions, _build_store, lambda options, config: _check(options, config, live=False))
LIVE = SourceSpec("esm_live", EsmOptions, _build_live, lambda options, config: _check(options, config, live=True), table="esm")
