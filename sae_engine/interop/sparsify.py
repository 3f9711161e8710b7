"""EleutherAI sparsify (``eai-sparsify`` 1.3): a folder with ``cfg.json`` and ``sae.safetensors``.

``SparseCoder.load_from_disk(DIR)`` (alias ``Sae``) reads it. sparsify keeps the engine's
layout: ``encoder.weight`` [n, d_in], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d] and,
with a skip connection, ``W_skip`` [d, d]. It has TopK SAEs and transcoders whose output width
equals the input width; no BatchTopK or threshold encoder (its other activation, groupmax, is
refused on import).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .portable import InteropError, PortableSAE

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"


def save(sae: PortableSAE, out: Path) -> Path:
    """Write ``sae`` as a sparsify folder at ``out`` (fresh or empty)."""
    if sae.kind != "topk":
        raise InteropError("sparsify cannot represent a BatchTopK model: it has no inference threshold "
                           "(activations 'topk' and 'groupmax' only); use --format saelens or dictionary_learning")
    if sae.transcoder and sae.d_out != sae.d_in:
        raise InteropError(f"sparsify transcoders predict a vector as wide as their input; this one maps "
                           f"d_in = {sae.d_in} to d_out = {sae.d_out}")
    weights = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.W_skip is not None:
        weights["W_skip"] = sae.W_skip
    cfg = {"activation": "topk", "expansion_factor": max(sae.n_latents // sae.d_in, 1), "normalize_decoder": True,
           "num_latents": sae.n_latents, "k": sae.k, "multi_topk": False, "skip_connection": sae.W_skip is not None,
           "transcode": sae.transcoder, "d_in": sae.d_in}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file({name: t.float().contiguous() for name, t in weights.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def load(path: Path, k: int | None = None, row_cap: int | None = None) -> PortableSAE:
    """A sparsify folder as a PortableSAE (fp32). ``k``, when given, must equal the file's;
    ``row_cap`` is for threshold encoders and unused here."""
    cfg_path, weights_path = path / CONFIG, path / WEIGHTS
    if not path.is_dir() or not cfg_path.exists() or not weights_path.exists():
        raise InteropError(f"{path}: not a sparsify folder (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = {name: t.float() for name, t in load_file(str(weights_path)).items()}
    except (OSError, ValueError) as error:
        raise InteropError(f"{path}: cannot read: {error}") from error
    if cfg.get("activation", "topk") != "topk":
        raise InteropError(f"{cfg_path}: activation = {cfg['activation']!r}: sae-engine runs TopK only")
    if "k" not in cfg:
        raise InteropError(f"{cfg_path}: no k")
    if k is not None and k != cfg["k"]:
        raise InteropError(f"{cfg_path}: --k {k} differs from the file's k = {cfg['k']}")
    skip = bool(cfg.get("skip_connection", False))
    names = ["encoder.weight", "encoder.bias", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
    missing = [name for name in names if name not in tensors]
    if missing:
        raise InteropError(f"{weights_path}: missing tensor(s) {missing} (has {sorted(tensors)}); "
                           "a folder saved without its decoder cannot be imported")
    W_enc = tensors["encoder.weight"]
    if "d_in" in cfg and W_enc.dim() == 2 and cfg["d_in"] != W_enc.shape[1]:
        raise InteropError(f"{path}: {CONFIG} says d_in = {cfg['d_in']} but encoder.weight has shape {tuple(W_enc.shape)}")
    sae = PortableSAE(kind="topk", k=cfg["k"], W_enc=W_enc, b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"],
                      b_dec=tensors["b_dec"], transcoder=bool(cfg.get("transcode", False)),
                      W_skip=tensors["W_skip"] if skip else None)
    sae.check(str(path))
    return sae


def kernel_weights(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc [n, d_in], b_enc [n], W_dec [n, d]) of a sparsify folder for ``sae_kernels``: as stored."""
    tensors = load_file(str(Path(path) / WEIGHTS))
    return tensors["encoder.weight"], tensors["encoder.bias"], tensors["W_dec"]
