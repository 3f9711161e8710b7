"""Live ESM2 activations: the ring buffer's producer runs the model, nothing goes to disk.

``LiveSource`` is an ActivationSource over a FASTA file: its vectors are the rows an
activation store of the same settings would hold, in the same order (windows cropped to the
model, length-planned and shuffled batches), computed batch by batch when the ring buffer's
refill thread asks for them, so ESM2's forward overlaps SAE training. For transcoders it yields
the input and target layers side by side, ``[m, 2 * E]``. ``iter_from(start)`` skips whole
batches before ``start`` without running them, so a resumed run recomputes at most one batch.
The model runs where its parameters are (move it to CUDA for a device-resident pipeline), at
``precision`` decided for that device (:func:`sae_engine.training.precision.resolve_precision`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..training.precision import resolve_precision
from .batching import Tokenizer, plan_batches
from .fasta import crop, read_fasta
from .forward import FastESM2, vectors

if TYPE_CHECKING:
    from .models import LoadedModel

log = logging.getLogger(__name__)


class LiveSource:
    """ESM2 vectors of ``layers`` for every residue (or pooled window) of a FASTA, on demand."""

    def __init__(
        self,
        fasta: str | Path,
        loaded: LoadedModel,
        layers: Sequence[int],
        *,
        pool: str = "none",
        max_tokens: int = 4096,
        precision: str = "auto",
        seed: int = 0,
    ) -> None:
        self.windows = crop(read_fasta(fasta))  # an empty FASTA is a FastaError
        self.layers, self.pool = tuple(layers), pool
        device = next(loaded.model.parameters()).device
        self.precision = resolve_precision(precision, device.type)
        log.info("live ESM2 on %s in %s (%s)", device, self.precision.dtype, self.precision.reason)
        self.runner = FastESM2(loaded.model, bf16=self.precision.dtype == "bf16")
        self.tokenizer = Tokenizer(loaded.alphabet)
        self.batches = plan_batches([len(w.sequence) for w in self.windows], max_tokens, seed)
        self.batch_rows = [
            sum(len(self.windows[i].sequence) for i in batch) if pool == "none" else len(batch)
            for batch in self.batches
        ]
        self.d = loaded.model.embed_dim * len(self.layers)
        self.description = loaded.info.description

    def __len__(self) -> int:
        return sum(self.batch_rows)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        seen = 0
        for batch, rows in zip(self.batches, self.batch_rows):
            if seen + rows <= start:
                seen += rows
                continue
            with torch.inference_mode():
                out = vectors(self.runner, self.tokenizer, [self.windows[i].sequence for i in batch],
                              self.layers, self.pool)
            chunk = torch.cat([out[layer] for layer in self.layers], dim=1)
            yield chunk[max(0, start - seen) :]
            seen += rows
