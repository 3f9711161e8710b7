"""ESM2 extraction: proteins -> vectors, in memory (:func:`embed`) or into a resumable store.

Flow: FASTA -> validated records -> windows of at most 1022 residues -> batches (sorted by length,
at most ``max_tokens`` padded positions each) -> :class:`~.forward.FastESM2` -> residue vectors
(BOS, EOS and padding dropped) or per-window pooled vectors -> ``.npy`` shards + manifest
(:mod:`.store`). Layer numbering: see :mod:`.forward`; the manifest records ``final_norm``.

Precision: ``ExtractConfig.precision`` ("auto", "bf16", "fp32") is decided for the model's device
by :func:`sae_engine.training.precision.resolve_precision` (bf16 where the hardware has bf16 matrix units),
logged, and recorded in the manifest as ``precision_resolved``; a resumed store keeps its dtype.

Under torchrun (``torchrun --nproc-per-node N -m sae_engine extract ...``) the batches of the
one-process plan are dealt round-robin to the ranks (see :mod:`.ranks`): every window is computed
in the same batch as in one process, into one store (see :mod:`.store`).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..training.precision import CHOICES as PRECISIONS
from ..training.precision import Precision, resolve_precision
from .batching import Tokenizer, plan_batches
from .fasta import ESM2_MAX_RESIDUES, Record, crop, read_fasta
from .forward import FastESM2, vectors
from .ranks import join_ranks
from .store import STORE_FORMAT, ActivationStore, StoreError, StoreWriter, existing_manifest, merge_rank_manifests

if TYPE_CHECKING:  # fair-esm is an optional extra: imported only when a model is loaded
    from .models import LoadedModel

POOLS = ("none", "mean", "max")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. ``layers`` in 0..num_layers (layer numbering: see :mod:`.forward`)."""

    layers: tuple[int, ...]
    pool: str = "none"  # "none" (one vector per residue), "mean" or "max" (one per window)
    max_tokens: int = 4096  # padded positions per batch
    precision: str = "auto"  # "auto" (decided by the hardware), "bf16" or "fp32" matrix products
    final_norm: bool = True  # last layer after emb_layer_norm_after, as fair-esm returns it
    max_residues: int = ESM2_MAX_RESIDUES
    crop: str = "window"  # "window" or "truncate" (see fasta.crop)
    overlap: int = 256
    store_dtype: str = "float32"  # "float32" or "float16"
    shard_rows: int = 65536  # rows per shard file (proteins are never split across shards)
    seed: int = 0  # batch order

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {list(POOLS)}, got {self.pool!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"store dtype must be float32 or float16, got {self.store_dtype!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty, got {self.layers}")
        if self.max_tokens < 3 or self.shard_rows < 1:
            raise ValueError("max_tokens must be >= 3 and shard_rows >= 1")


def embed(
    model: torch.nn.Module,
    alphabet: Any,
    sequences: Sequence[str],
    layers: Sequence[int],
    *,
    pool: str = "none",
    max_tokens: int = 4096,
    bf16: bool = False,
    final_norm: bool = True,
) -> list[dict[int, torch.Tensor]]:
    """In-memory extraction: per input sequence, {layer: [len, E]} (or [E] when pooled).

    Sequences must already fit the model (see :func:`sae_engine.esm.fasta.crop`).
    """
    runner, tokenizer = FastESM2(model, bf16=bf16), Tokenizer(alphabet)
    results: list[dict[int, torch.Tensor]] = [{} for _ in sequences]
    for batch in plan_batches([len(s) for s in sequences], max_tokens, seed=None):
        chunk = [sequences[i] for i in batch]
        rows = vectors(runner, tokenizer, chunk, layers, pool, final_norm)
        for layer, values in rows.items():
            parts = values.split([len(s) for s in chunk]) if pool == "none" else values.unbind(0)
            for i, part in zip(batch, parts):
                results[i][layer] = part
    return results


@dataclass
class ExtractSummary:
    """What an extraction run did."""

    store: Path
    windows: int
    skipped: int  # already in the store (resumed)
    residues: int
    rows: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def residues_per_second(self) -> float:
        return self.residues / self.seconds if self.seconds else 0.0


def extract_to_store(
    records: Sequence[Record] | str | Path,
    loaded: LoadedModel,
    out: str | Path,
    config: ExtractConfig,
    *,
    progress: bool = True,
    rank_timeout_s: float = 3600.0,
) -> ExtractSummary:
    """Extract ``config.layers`` for every protein into the store at ``out``; resumes a killed run.

    ``records`` is a FASTA path or validated records. Windows already committed to the store are
    skipped; the rest are batched, run and committed shard by shard. Under torchrun this rank runs
    its share on its own device and the summary counts its share; ``rank_timeout_s`` bounds the
    wait for the other ranks.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    fasta = None
    if isinstance(records, (str, Path)):
        fasta = str(Path(records).resolve())
        records = list(read_fasta(records))
    if not records:
        raise ValueError("no proteins to extract")
    if max(config.layers) > loaded.info.num_layers or min(config.layers) < 0:
        raise ValueError(f"layers {list(config.layers)} out of range: {loaded.info.spec} has layers 0..{loaded.info.num_layers}")
    windows = crop(records, config.max_residues, config.crop, config.overlap)
    digest = hashlib.sha256()
    for window in windows:
        digest.update(f"{window.key}\t{window.sequence}\n".encode())
    header = {
        "format": STORE_FORMAT,
        "settings": {**asdict(config), "layers": list(config.layers), "d": loaded.info.embed_dim},
        "model": loaded.info.to_dict(),
        "input": {"fasta": fasta, "sha256": digest.hexdigest(), "proteins": len(records), "windows": len(windows)},
    }
    ranks = join_ranks(rank_timeout_s)
    if ranks is not None:
        loaded.model.to(ranks.device)
    device = next(loaded.model.parameters()).device
    precision = store_precision(Path(out), config.precision, device.type)
    log.info("ESM2 extraction on %s in %s (%s)", device, precision.dtype, precision.reason)
    header["precision_resolved"] = {"dtype": precision.dtype, "reason": precision.reason}
    writer = StoreWriter(Path(out), header, rank=None if ranks is None else ranks.rank)
    # The plan covers every window, so a resumed or sharded run puts each window in the batch it
    # has in one uninterrupted process (same padding, same vectors); done windows are dropped.
    plan = plan_batches([len(w.sequence) for w in windows], config.max_tokens, config.seed)
    if ranks is not None:
        plan = plan[ranks.rank :: ranks.world_size]
    mine = sum(map(len, plan))
    plan = [todo for todo in ([i for i in batch if windows[i].key not in writer.done] for batch in plan) if todo]
    runner, tokenizer = FastESM2(loaded.model, bf16=precision.dtype == "bf16"), Tokenizer(loaded.alphabet)
    residues = sum(len(windows[i].sequence) for batch in plan for i in batch)
    with tqdm(total=residues, unit="res", unit_scale=True, desc="extracting", disable=not progress) as bar:
        for batch in plan:
            chunk = [windows[i] for i in batch]
            rows = vectors(runner, tokenizer, [w.sequence for w in chunk], config.layers, config.pool, config.final_norm)
            counts = [len(w.sequence) if config.pool == "none" else 1 for w in chunk]
            writer.add(chunk, rows, counts)
            bar.update(sum(len(w.sequence) for w in chunk))
    writer.finish()
    if ranks is not None:
        ranks.barrier()  # every rank has finished its share
        if ranks.rank == 0:
            merge_rank_manifests(Path(out), ranks.world_size)
        ranks.barrier()  # the merged manifest is there for everyone
        ranks.close()
    computed = sum(map(len, plan))
    return ExtractSummary(Path(out), mine, mine - computed, residues, len(ActivationStore(out)),
                          time.perf_counter() - started)


def store_precision(out: Path, requested: str, device_type: str) -> Precision:
    """The compute precision of an extraction into ``out``: a store being resumed keeps the dtype
    it was started with (an explicit other one is an error: one store, one dtype); a new store
    gets ``requested`` decided for ``device_type``."""
    manifest = existing_manifest(out)
    started = manifest.get("precision_resolved") if manifest else None
    if started is None:
        return resolve_precision(requested, device_type)
    if requested not in ("auto", started["dtype"]):
        raise StoreError(f"{out} holds vectors computed in {started['dtype']}; precision {requested} would mix "
                         f"{requested} and {started['dtype']} in one store (use {started['dtype']} or auto, or another store)")
    return Precision(started["dtype"], f"kept from the store being resumed ({started['reason']})")


def ensure_store(
    store: str | Path,
    *,
    layers: Sequence[int],
    fasta: str | Path | None = None,
    model: str | None = "default",
    pool: str = "none",
    max_tokens: int = 4096,
    precision: str = "auto",
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> ActivationStore:
    """A complete store at ``store`` holding ``layers``: opened if there, else extracted (or resumed)
    from ``fasta`` with ``model`` at ``precision`` ("auto", "bf16", "fp32"). For training configs
    that name a store and how to make it."""
    path = Path(store)
    if (path / "manifest.json").exists():
        existing = ActivationStore(path)
        if existing.complete and set(layers) <= set(existing.layers):
            return existing
    if fasta is None:
        raise StoreError(f"activation store {path} is missing or incomplete and no FASTA was given to extract it from")
    from .models import load_model

    loaded = load_model(model, data_dir=data_dir)
    config = ExtractConfig(layers=tuple(layers), pool=pool, max_tokens=max_tokens, precision=precision)
    extract_to_store(fasta, loaded, path, config, progress=progress)
    return ActivationStore(path)


