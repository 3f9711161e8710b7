"""Reconstruction fidelity inside ESM2: masked-LM loss with an SAE spliced in at its layer.

The residual stream after block ``layer`` is replaced, at residue positions (not BOS, EOS or
padding), by a function of it: the SAE's reconstruction, the identity (the model as it is) or
zeros (the ablation baseline). The fraction of loss recovered is
``(L_zero - L_sae) / (L_zero - L_model)``: 1 when the reconstruction is perfect, 0 when it is
no better than deleting the layer's output (as InterPLM reports it). Masked positions: a fixed
``mask_fraction`` of residues per protein, chosen by ``seed``, replaced by <mask>. Only
intermediate layers can be spliced: the last layer's stored vectors are after the final layer
norm, which the LM head reads directly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .batching import Tokenizer

if TYPE_CHECKING:
    from .models import LoadedModel

Replace = Callable[[torch.Tensor], torch.Tensor]  # residue vectors [r, E] -> [r, E]


@dataclass
class LossRecovered:
    loss_model: float
    loss_spliced: float
    loss_zero: float

    @property
    def fraction(self) -> float:
        return (self.loss_zero - self.loss_spliced) / (self.loss_zero - self.loss_model)


def mask_residues(tokens: torch.Tensor, lengths: torch.Tensor, mask_idx: int, fraction: float,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``fraction`` of each protein's residues (at least one), chosen by ``seed``.

    tokens [B, T] (BOS, residues, EOS, padding), lengths [B] -> (masked tokens [B, T], chosen bool [B, T]).
    """
    g = torch.Generator().manual_seed(seed)
    chosen = torch.zeros(tokens.shape, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        count = max(1, round(fraction * length))
        chosen[row, 1 + torch.randperm(length, generator=g)[:count]] = True
    return tokens.masked_fill(chosen, mask_idx), chosen


def masked_lm_loss(loaded: LoadedModel, sequences: Sequence[str], layer: int, replace: Replace | None,
                   mask_fraction: float = 0.15, seed: int = 0, batch_size: int = 8) -> float:
    """Mean cross-entropy at masked residues, with block ``layer``'s output passed through ``replace``.

    Batches of ``batch_size`` sequences; batch ``i`` masks with seed ``seed + i * batch_size``.
    """
    model, alphabet = loaded.model.eval(), loaded.alphabet
    if not loaded.info.has_lm_head:
        raise ValueError(f"{loaded.info.description}: these weights have no masked-LM head, so there is no "
                         "masked-LM loss to recover; use official ESM2 weights")
    if not 1 <= layer < model.num_layers:
        raise ValueError(f"layer must be an intermediate layer, 1..{model.num_layers - 1}; got {layer}")
    tokenizer = Tokenizer(alphabet)
    hook = None
    total, count = 0.0, 0
    try:
        for lo in range(0, len(sequences), batch_size):
            chunk = list(sequences[lo : lo + batch_size])
            tokens = tokenizer(chunk)
            lengths = torch.tensor([len(s) for s in chunk])
            positions = torch.arange(tokens.shape[1])
            residue = (positions[None, :] >= 1) & (positions[None, :] <= lengths[:, None])  # [B, T]
            masked, chosen = mask_residues(tokens, lengths, alphabet.mask_idx, mask_fraction, seed + lo)
            if replace is not None:

                def splice(module, inputs, output, residue=residue):
                    x, attn = output  # x: [T, B, E] inside fair-esm's blocks
                    x = x.clone()
                    spots = residue.T
                    x[spots] = replace(x[spots].float()).to(x.dtype)
                    return x, attn

                hook = model.layers[layer - 1].register_forward_hook(splice)
            with torch.inference_mode():
                logits = model(masked)["logits"]
            if hook is not None:
                hook.remove()
                hook = None
            loss = F.cross_entropy(logits[chosen].float(), tokens[chosen], reduction="sum")
            total += loss.item()
            count += int(chosen.sum())
    finally:
        if hook is not None:
            hook.remove()
    return total / count


def loss_recovered(loaded: LoadedModel, sequences: Sequence[str], layer: int, reconstruct: Replace,
                   mask_fraction: float = 0.15, seed: int = 0) -> LossRecovered:
    """Masked-LM loss of the model as it is, with ``reconstruct`` spliced in, and with zeros."""
    args = dict(mask_fraction=mask_fraction, seed=seed)
    return LossRecovered(
        loss_model=masked_lm_loss(loaded, sequences, layer, None, **args),
        loss_spliced=masked_lm_loss(loaded, sequences, layer, reconstruct, **args),
        loss_zero=masked_lm_loss(loaded, sequences, layer, torch.zeros_like, **args),
    )
