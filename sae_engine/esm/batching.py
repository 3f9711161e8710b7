"""Proteins into model batches: length-planned batches under a token budget, and tokens."""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .fasta import FastaError


def plan_batches(lengths: Sequence[int], max_tokens: int, seed: int | None = 0) -> list[list[int]]:
    """Group items into batches of similar length, each at most ``max_tokens`` padded tokens.

    ``lengths`` are residues; a batch costs ``size x (longest + 2)`` (BOS and EOS). An item longer
    than the budget gets a batch of its own. Batches are shuffled (``seed``; None keeps them
    sorted) so a store does not run from short to long proteins, which a ring buffer of limited
    size could not mix away.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (lengths[i] + 2) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


class Tokenizer:
    """Residue strings -> ``[B, T]`` token ids (BOS, residues, EOS, padding) via a byte lookup table."""

    def __init__(self, alphabet: Any) -> None:
        self.cls, self.eos, self.pad = alphabet.cls_idx, alphabet.eos_idx, alphabet.padding_idx
        self.table = np.full(256, -1, dtype=np.int64)
        for letter in "ACDEFGHIKLMNPQRSTVWYXBZUO":
            self.table[ord(letter)] = alphabet.get_idx(letter)

    def __call__(self, sequences: Sequence[str]) -> torch.Tensor:
        longest = max(map(len, sequences))
        tokens = np.full((len(sequences), longest + 2), self.pad, dtype=np.int64)
        tokens[:, 0] = self.cls
        for row, sequence in enumerate(sequences):
            ids = self.table[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]
            if (ids < 0).any():
                bad = sequence[int(np.argmax(ids < 0))]
                raise FastaError(f"residue {bad!r} has no ESM token (validate sequences with sae_engine.esm.fasta)")
            tokens[row, 1 : len(sequence) + 1] = ids
            tokens[row, len(sequence) + 1] = self.eos
        return torch.from_numpy(tokens)

