"""dictionary_learning (``dictionary-learning`` 0.1) and InterPLM: a folder with ``ae.pt`` and
``config.json``, or a lone ``ae.pt``.

``ae.pt`` is a ``torch.save``d state dict; ``dictionary_learning.utils.load_dictionary(DIR)``
reads the folder (``config.json``'s ``trainer.dict_class`` names the class) and each class's
``from_pretrained(FILE)`` the file alone. Layout: ``encoder.weight`` [n, d] (nn.Linear),
``encoder.bias`` [n], ``decoder.weight`` [d, n] (nn.Linear: the engine's transpose), then
    AutoEncoderTopK, BatchTopKSAE   ``b_dec`` [d], ``k`` (int), ``threshold`` (-1 = none)
    AutoEncoder (ReLU)              ``bias`` [d]: InterPLM's published ESM2 SAEs (its ReLUSAE
                                    adds ``activation_rescale_factor``, used only for optional
                                    feature scaling, and ``normalize_to_sqrt_d``, refused when set)
A lone file with ``k`` is read as AutoEncoderTopK (what ``from_pretrained`` of that class does)
unless a ``config.json`` beside it names BatchTopKSAE. No transcoders.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..atomic import atomic_path
from .portable import RELU_THRESHOLD, InteropError, PortableSAE

WEIGHTS = "ae.pt"
CONFIG = "config.json"
CLASSES = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE"}


def save(sae: PortableSAE, out: Path) -> Path:
    """Write ``sae`` as a dictionary_learning folder (``ae.pt`` + ``config.json``) at ``out``."""
    if sae.transcoder:
        raise InteropError("dictionary_learning cannot represent a transcoder (its dictionaries reconstruct "
                           "their input); use --format sparsify or saelens")
    state = {
        "k": torch.tensor(sae.k, dtype=torch.int32),
        "threshold": torch.tensor(float(sae.threshold) if sae.kind == "batchtopk" else -1.0, dtype=torch.float32),
        "decoder.weight": sae.W_dec.T.contiguous().float(),
        "encoder.weight": sae.W_enc.contiguous().float(),
        "encoder.bias": sae.b_enc.contiguous().float(),
        "b_dec": sae.b_dec.contiguous().float(),
    }
    config = {"trainer": {"dict_class": CLASSES[sae.kind], "activation_dim": sae.d_in, "dict_size": sae.n_latents,
                          "k": sae.k}}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """State dict, config (empty when absent) and the weights file of a folder or a file."""
    weights = path / WEIGHTS if path.is_dir() else path
    if not weights.is_file():
        raise InteropError(f"{path}: not a dictionary_learning checkpoint (needs {WEIGHTS}, or a .pt file)")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise InteropError(f"{weights}: not a torch state dict: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise InteropError(f"{weights}: not a state dict of tensors")
    config_path = weights.parent / CONFIG
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return state, config, weights


def load(path: Path, k: int | None = None, row_cap: int | None = None) -> PortableSAE:
    """A dictionary_learning / InterPLM checkpoint as a PortableSAE (fp32).

    ``k`` is needed for a ReLU AutoEncoder (it has none): it becomes the BatchTopK k for further
    training, and inference keeps up to ``row_cap`` positive latents per row.
    """
    state, config, weights = _read(path)
    if bool(state.get("normalize_to_sqrt_d", torch.tensor(False))):
        raise InteropError(f"{weights}: normalize_to_sqrt_d = True rescales each vector by its own norm, "
                           "which no weights can hold")
    dict_class = config.get("trainer", {}).get("dict_class")
    relu = "bias" in state and "b_dec" not in state
    names = ["encoder.weight", "encoder.bias", "decoder.weight"] + (["bias"] if relu else ["b_dec", "k"])
    missing = [name for name in names if name not in state]
    if missing:
        raise InteropError(f"{weights}: missing tensor(s) {missing} (has {sorted(state)})")
    if dict_class not in (None, "AutoEncoder", *CLASSES.values()):
        raise InteropError(f"{weights.parent / CONFIG}: dict_class {dict_class!r} cannot be held by sae-engine; "
                           f"readable: AutoEncoder, {', '.join(CLASSES.values())}")
    W_dec = state["decoder.weight"]
    if W_dec.dim() != 2:
        raise InteropError(f"{weights}: decoder.weight has shape {tuple(W_dec.shape)}, expected [d, n]")
    sae = PortableSAE(kind="topk", k=0, W_enc=state["encoder.weight"].float(), b_enc=state["encoder.bias"].float(),
                      W_dec=W_dec.T.float(), b_dec=state["bias" if relu else "b_dec"].float())
    if relu:
        if k is None:
            raise InteropError(f"{weights}: a ReLU AutoEncoder has no k; pass --k (the BatchTopK k for further "
                               "training; inference keeps up to --row-cap positive latents per vector)")
        sae.kind, sae.k, sae.row_cap, sae.threshold = "batchtopk", k, row_cap, RELU_THRESHOLD
    else:
        stored_k = int(state["k"])
        if k is not None and k != stored_k:
            raise InteropError(f"{weights}: --k {k} differs from the file's k = {stored_k}")
        sae.k = stored_k
        if dict_class == "BatchTopKSAE":
            threshold = float(state.get("threshold", torch.tensor(-1.0)))
            if threshold < 0:
                raise InteropError(f"{weights}: a BatchTopKSAE without an inference threshold ({threshold})")
            sae.kind, sae.threshold, sae.row_cap = "batchtopk", max(threshold, RELU_THRESHOLD), row_cap
    sae.check(str(weights))
    return sae


def kernel_weights(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc [n, d], b_enc [n], W_dec [n, d]) for ``sae_kernels``: W_dec is the transposed view of
    the stored [d, n] decoder.weight (no copy; the Triton path makes one contiguous copy)."""
    state, _, _ = _read(Path(path))
    return state["encoder.weight"], state["encoder.bias"], state["decoder.weight"].T
