"""ESM2's forward pass for extraction: the layers asked for, nothing more.

Which representation a layer index means (fair-esm's convention, kept so vectors match tools
built on fair-esm): layer 0 is the scaled token embedding; layer ``i`` is the residual stream
after block ``i``; the LAST layer ``L`` is returned after ``emb_layer_norm_after``, as fair-esm
returns it, while intermediate layers are raw residual streams. ``final_norm=False`` returns the
raw residual stream for ``L`` too, so every layer means the same thing (useful for transcoders
spanning ``L-1 -> L``).

Speed (see ``bench/test_bench_esm.py``): fair-esm's math with fused QKV projections,
``scaled_dot_product_attention`` (no ``[B, H, T, T]`` weights), no LM head, an early stop after
the deepest requested layer, and the feed-forward done in row blocks into reused buffers.
``bf16`` runs the matrix products in bfloat16 and keeps the residual stream, layer norms and
attention in float32. Everything runs on the device of the model's parameters (CPU or CUDA):
tokens are moved there, every tensor made here is made there, and results stay there. Callers
that run many batches on the CPU gain from glibc keeping freed memory
(:func:`sae_engine.memory.tune_allocator`, process-wide: the CLI calls it, libraries don't).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .batching import Tokenizer


def _add_linear_(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """``residual += x @ weight.T + bias`` without a temporary when the dtypes agree."""
    if x.dtype == residual.dtype:
        residual.addmm_(x, weight.t()).add_(bias)
    else:
        residual += torch.addmm(bias, x, weight.t()).to(residual.dtype)


class FastESM2:
    """Inference-only forward of a fair-esm ``ESM2`` returning chosen layers' representations.

    Weights are shared with (fp32) or copied from (bf16) the module; the module is not changed.
    """

    def __init__(self, model: torch.nn.Module, bf16: bool = False, ffn_block: int = 2048) -> None:
        self.model = model.eval()
        self.bf16 = bf16
        self.ffn_block = ffn_block
        self.num_layers: int = model.num_layers
        self.embed_dim: int = model.embed_dim
        self.heads: int = model.attention_heads
        self.head_dim = self.embed_dim // self.heads
        self.padding_idx, self.mask_idx = model.padding_idx, model.mask_idx
        self.device = next(model.parameters()).device
        compute = torch.bfloat16 if bf16 else torch.float32
        with torch.no_grad():
            self.blocks = []
            for layer in model.layers:
                attn = layer.self_attn
                qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(compute)
                qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]).to(compute)
                self.blocks.append(
                    {
                        "ln1": (layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias, layer.self_attn_layer_norm.eps),
                        "qkv": (qkv_w, qkv_b),
                        "out": (attn.out_proj.weight.to(compute), attn.out_proj.bias.to(compute)),
                        "ln2": (layer.final_layer_norm.weight, layer.final_layer_norm.bias, layer.final_layer_norm.eps),
                        "fc1": (layer.fc1.weight.to(compute), layer.fc1.bias.to(compute)),
                        "fc2": (layer.fc2.weight.to(compute), layer.fc2.bias.to(compute)),
                        "inv_freq": attn.rot_emb.inv_freq,
                    }
                )
        self.compute = compute
        self._rotary: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ffn_buffer = torch.empty(0, dtype=compute, device=self.device)

    def _rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, head_dim]`` as fair-esm's RotaryEmbedding builds them (cached per T)."""
        if length not in self._rotary:
            inv_freq = self.blocks[0]["inv_freq"].to(self.device)
            t = torch.arange(length, dtype=inv_freq.dtype, device=self.device)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rotary[length] = (emb.cos(), emb.sin())
        return self._rotary[length]

    def _rotate_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of ``x`` [..., T, hd]: ``x * cos + rotate_half(x) * sin`` in three ops."""
        half = self.head_dim // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin[:, :half], value=-1.0)
        out[..., half:].addcmul_(x[..., :half], sin[:, half:])
        return out

    def _ffn(self, x: torch.Tensor, block: dict[str, Any]) -> None:
        """``x += fc2(gelu(fc1(LN(x))))`` in row blocks, through one reused buffer. x: [N, E]."""
        w1, b1 = block["fc1"]
        w2, b2 = block["fc2"]
        rows = x.shape[0]
        step = min(self.ffn_block, rows)
        if self._ffn_buffer.shape[0] < step * w1.shape[0]:
            self._ffn_buffer = torch.empty(step * w1.shape[0], dtype=self.compute, device=self.device)
        weight, bias, eps = block["ln2"]
        for lo in range(0, rows, step):
            part = x[lo : lo + step]
            hidden = self._ffn_buffer[: part.shape[0] * w1.shape[0]].view(part.shape[0], w1.shape[0])
            normed = F.layer_norm(part, (self.embed_dim,), weight, bias, eps).to(self.compute)
            torch.addmm(b1, normed, w1.t(), out=hidden)
            torch.ops.aten.gelu_(hidden)  # erf GELU, as fair-esm's
            _add_linear_(part, hidden, w2, b2)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, layers: Sequence[int], final_norm: bool = True, rows: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """Representations of ``layers`` for ``tokens`` [B, T] -> {layer: [B, T, E] float32}.

        With ``rows`` (positions into the flattened ``B * T`` tokens, [N] int64) each layer comes
        back as those rows only, [N, E]: one copy of what is kept instead of the whole batch.
        ``tokens`` and ``rows`` may be on any device; the results are on the model's.
        """
        wanted = set(layers)
        if not wanted or min(wanted) < 0 or max(wanted) > self.num_layers:
            raise ValueError(f"layers must be in 0..{self.num_layers}, got {sorted(wanted)}")
        model = self.model
        tokens = tokens.to(self.device)
        rows = None if rows is None else rows.to(self.device)
        batch, length = tokens.shape
        padding = tokens.eq(self.padding_idx)
        x = model.embed_scale * model.embed_tokens(tokens)
        if model.token_dropout:
            # fair-esm rescales embeddings by the masking ratio seen in training, also at inference.
            masked = tokens.eq(self.mask_idx)
            x.masked_fill_(masked.unsqueeze(-1), 0.0)
            observed = masked.sum(-1).to(x.dtype) / (~padding).sum(-1)
            x = x * ((1 - 0.15 * 0.8) / (1 - observed))[:, None, None]
        x = x * (~padding).unsqueeze(-1).to(x.dtype)
        out: dict[int, torch.Tensor] = {}

        def keep_rows(rep: torch.Tensor) -> torch.Tensor:
            """A copy of ``rep`` [B, T, E] (or of its chosen rows)."""
            if rows is None:
                return rep.clone()
            return rep.reshape(batch * length, self.embed_dim).index_select(0, rows)

        if 0 in wanted:
            out[0] = keep_rows(x)
        keep = (~padding)[:, None, None, :] if padding.any() else None  # True = may attend
        cos, sin = self._rotary_tables(length)
        flat = x.reshape(batch * length, self.embed_dim)
        for index, block in enumerate(self.blocks[: max(wanted)]):
            weight, bias, eps = block["ln1"]
            normed = F.layer_norm(flat, (self.embed_dim,), weight, bias, eps).to(self.compute)
            qkv = F.linear(normed, *block["qkv"]).view(batch, length, 3, self.heads, self.head_dim)
            # Attention stays in fp32 in bf16 mode: with 16-wide heads the CPU's bf16 attention
            # kernel is slower than its fp32 one, and the cast is cheap.
            qkv = qkv.permute(2, 0, 3, 1, 4).float()  # [3, B, H, T, hd]
            q, k = self._rotate_(qkv[:2], cos, sin).unbind(0)
            attended = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=keep, scale=self.head_dim**-0.5)
            attended = attended.transpose(1, 2).reshape(batch * length, self.embed_dim).to(self.compute)
            _add_linear_(flat, attended, *block["out"])
            self._ffn(flat, block)
            depth = index + 1
            if depth in wanted:
                rep = flat.view(batch, length, self.embed_dim)
                if depth == self.num_layers and final_norm:  # the norm writes a new tensor itself
                    out[depth] = model.emb_layer_norm_after(rep if rows is None else keep_rows(rep))
                else:
                    out[depth] = keep_rows(rep)
        return out



def vectors(
    runner: FastESM2, tokenizer: Tokenizer, sequences: Sequence[str], layers: Sequence[int], pool: str = "none", final_norm: bool = True
) -> dict[int, torch.Tensor]:
    """One batch through the model -> {layer: rows}; rows are every residue of every sequence
    in order (``[sum(len), E]``) for ``pool="none"``, else one pooled row per sequence ``[B, E]``.
    The rows are on the model's device."""
    tokens = tokenizer(sequences).to(runner.device)
    lengths = torch.tensor([len(s) for s in sequences], device=runner.device)
    positions = torch.arange(tokens.shape[1], device=runner.device)
    residue = (positions[None, :] >= 1) & (positions[None, :] <= lengths[:, None])  # [B, T]: not BOS/EOS/pad
    if pool == "none":
        return runner(tokens, layers, final_norm, rows=residue.view(-1).nonzero().squeeze(1))
    reps = runner(tokens, layers, final_norm)
    out = {}
    for layer, rep in reps.items():
        if pool == "mean":
            out[layer] = (rep * residue[..., None]).sum(1) / lengths[:, None]
        else:
            out[layer] = rep.masked_fill(~residue[..., None], -math.inf).amax(1)
    return out

