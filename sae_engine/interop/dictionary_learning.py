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
CLASSES = {"topk": "AutoEncoderTopK", "batchtopk": "BatchTopKSAE", "jumprelu": "JumpReluAutoEncoder"}
JUMPRELU_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")  # JumpReluAutoEncoder's state: W_enc [d, n]
MATRYOSHKA_CLASS = "MatryoshkaBatchTopKSAE"  # W_enc [d, n], W_dec [n, d], k, threshold, group_sizes
MATRYOSHKA_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes")


def save(sae: PortableSAE, out: Path) -> Path:
    """Write ``sae`` as a dictionary_learning folder (``ae.pt`` + ``config.json``) at ``out``."""
    if sae.transcoder:
        raise InteropError("dictionary_learning cannot represent a transcoder (its dictionaries reconstruct "
                           "their input); use --format sparsify or saelens")
    if sae.kind == "jumprelu":
        return _write(_jumprelu_state(sae), {"dict_class": CLASSES["jumprelu"], "activation_dim": sae.d_in,
                                             "dict_size": sae.n_latents}, out)
    if sae.prefixes is not None:
        return _write(_matryoshka_state(sae), {"dict_class": MATRYOSHKA_CLASS, "activation_dim": sae.d_in,
                                               "dict_size": sae.n_latents, "k": sae.k}, out)
    state = {
        "k": torch.tensor(sae.k, dtype=torch.int32),
        "threshold": torch.tensor(float(sae.threshold) if sae.kind == "batchtopk" else -1.0, dtype=torch.float32),
        "decoder.weight": sae.W_dec.T.contiguous().float(),
        "encoder.weight": sae.W_enc.contiguous().float(),
        "encoder.bias": sae.b_enc.contiguous().float(),
        "b_dec": sae.b_dec.contiguous().float(),
    }
    return _write(state, {"dict_class": CLASSES[sae.kind], "activation_dim": sae.d_in, "dict_size": sae.n_latents,
                          "k": sae.k}, out)


def _write(state: dict[str, torch.Tensor], trainer: dict, out: Path) -> Path:
    """``ae.pt`` (state) and ``config.json`` ({"trainer": trainer}) in a folder made whole at ``out``."""
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        torch.save(state, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps({"trainer": trainer}, indent=2))
    return out


def _jumprelu_state(sae: PortableSAE) -> dict[str, torch.Tensor]:
    """JumpReluAutoEncoder's state dict: it encodes x @ W_enc + b_enc without subtracting b_dec
    (apply_b_dec_to_input is False), so b_enc holds b_enc - W_enc b_dec."""
    return {"W_enc": sae.W_enc.T.contiguous().float(), "b_enc": (sae.b_enc - sae.W_enc @ sae.b_dec).float(),
            "W_dec": sae.W_dec.contiguous().float(), "b_dec": sae.b_dec.contiguous().float(),
            "threshold": sae.thresholds.contiguous().float()}


def _matryoshka_state(sae: PortableSAE) -> dict[str, torch.Tensor]:
    """MatryoshkaBatchTopKSAE's state dict: group sizes are the differences of the prefix sizes."""
    sizes = torch.diff(torch.tensor([0, *sae.prefixes]))
    return {"W_enc": sae.W_enc.T.contiguous().float(), "b_enc": sae.b_enc.contiguous().float(),
            "W_dec": sae.W_dec.contiguous().float(), "b_dec": sae.b_dec.contiguous().float(),
            "k": torch.tensor(sae.k, dtype=torch.int32), "threshold": torch.tensor(float(sae.threshold or 0.0)),
            "group_sizes": sizes}


def _matryoshka_from(state: dict[str, torch.Tensor], k: int | None, row_cap: int | None, weights: Path) -> PortableSAE:
    """A MatryoshkaBatchTopKSAE state dict as a BatchTopK PortableSAE that keeps its prefixes."""
    stored_k, threshold = int(state["k"]), float(state["threshold"])
    if k is not None and k != stored_k:
        raise InteropError(f"{weights}: --k {k} differs from the file's k = {stored_k}")
    if threshold < 0:
        raise InteropError(f"{weights}: a {MATRYOSHKA_CLASS} without an inference threshold ({threshold})")
    sae = PortableSAE(kind="batchtopk", k=stored_k, W_enc=state["W_enc"].T.float().contiguous(),
                      b_enc=state["b_enc"].float(), W_dec=state["W_dec"].float(), b_dec=state["b_dec"].float(),
                      threshold=max(threshold, RELU_THRESHOLD), row_cap=row_cap,
                      prefixes=torch.cumsum(state["group_sizes"], 0).tolist())
    sae.check(str(weights))
    return sae


def _jumprelu_from(state: dict[str, torch.Tensor], row_cap: int | None, k: int | None, weights: Path) -> PortableSAE:
    """A JumpReluAutoEncoder state dict as a JumpReLU PortableSAE (relu(pre) * (pre > threshold):
    thresholds below 0 act as 0)."""
    if row_cap is None and k is None:
        raise InteropError(f"{weights}: a JumpReLU SAE keeps every latent above its threshold; pass --row-cap "
                           "(latents a vector keeps at most; the rest are counted as overflow)")
    W_enc, b_dec = state["W_enc"].T.float(), state["b_dec"].float()
    n = W_enc.shape[0]
    sae = PortableSAE(kind="jumprelu", k=k if k is not None else max(1, min(row_cap, n) // 4),
                      W_enc=W_enc.contiguous(), b_enc=state["b_enc"].float() + W_enc @ b_dec,
                      W_dec=state["W_dec"].float(), b_dec=b_dec, row_cap=row_cap,
                      thresholds=state["threshold"].float().clamp_min(0.0))
    sae.check(str(weights))
    return sae


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
    if dict_class == MATRYOSHKA_CLASS:
        missing = [name for name in MATRYOSHKA_TENSORS if name not in state]
        if missing:
            raise InteropError(f"{weights}: missing tensor(s) {missing} (has {sorted(state)})")
        return _matryoshka_from(state, k, row_cap, weights)
    if dict_class == CLASSES["jumprelu"] or (dict_class is None and all(name in state for name in JUMPRELU_TENSORS)):
        missing = [name for name in JUMPRELU_TENSORS if name not in state]
        if missing:
            raise InteropError(f"{weights}: missing tensor(s) {missing} (has {sorted(state)})")
        return _jumprelu_from(state, row_cap, k, weights)
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
