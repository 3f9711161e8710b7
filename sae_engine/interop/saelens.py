"""SAELens (``sae-lens`` 6): a folder with ``cfg.json`` and ``sae_weights.safetensors``.

``SAE.load_from_disk(DIR)`` reads it. SAELens keeps ``W_enc`` as [d_in, n] (the engine's
transpose) and ``W_dec`` as [n, d_out]. Architectures written and read:
    topk                       TopK SAE (SAELens has no TopK transcoder)
    jumprelu                   JumpReLU SAE (per-latent thresholds), and a BatchTopK SAE at
                               inference (SAELens saves its own BatchTopK SAEs so): one
                               threshold for every latent; read: one threshold -> BatchTopK
                               (needs --k), per-latent ones -> JumpReLU (through
                               ``sae_kernels.threshold_encode``, up to --row-cap latents a vector)
    jumprelu_transcoder,       BatchTopK transcoder, without / with a skip connection
    jumprelu_skip_transcoder
    standard, transcoder,      read only: ReLU, as a threshold encoder (see portable.py)
    skip_transcoder
Read only, folded into the weights: ``apply_b_dec_to_input = false``,
``rescale_acts_by_decoder_norm = true``. ``normalize_activations`` other than "none" (and
"expected_average_only_in", which SAELens itself ignores when loading from disk) is refused.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path
from .portable import RELU_THRESHOLD, InteropError, PortableSAE

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the version whose layout these files follow (tested)
THRESHOLD_ARCHITECTURES = {"jumprelu": False, "jumprelu_transcoder": True, "jumprelu_skip_transcoder": True}
RELU_ARCHITECTURES = {"standard": False, "transcoder": True, "skip_transcoder": True}


def save(sae: PortableSAE, out: Path) -> Path:
    """Write ``sae`` as an SAELens folder at ``out`` (fresh or empty)."""
    if sae.kind == "topk" and sae.transcoder:
        raise InteropError("SAELens cannot represent a TopK transcoder: its transcoders are ReLU or JumpReLU "
                           "(a BatchTopK transcoder exports as jumprelu_transcoder); use --format sparsify")
    weights = {"W_enc": sae.W_enc.T.contiguous(), "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    cfg = {"d_in": sae.d_in, "d_sae": sae.n_latents, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not sae.transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": {"sae_lens_version": SAELENS_VERSION}}
    if sae.kind == "topk":
        cfg.update(architecture="topk", k=sae.k, rescale_acts_by_decoder_norm=False)
    else:
        weights["threshold"] = (sae.thresholds if sae.kind == "jumprelu"
                                else torch.full((sae.n_latents,), float(sae.threshold or 0.0)))
        cfg["architecture"] = "jumprelu"
        if sae.transcoder:
            cfg.update(architecture="jumprelu_skip_transcoder" if sae.W_skip is not None else "jumprelu_transcoder",
                       d_out=sae.d_out)
            if sae.W_skip is not None:
                weights["W_skip"] = sae.W_skip
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file({name: t.float().contiguous() for name, t in weights.items()}, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def _require(tensors: dict[str, torch.Tensor], names: list[str], where: Path) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        raise InteropError(f"{where}: missing tensor(s) {missing} (has {sorted(tensors)})")


def load(path: Path, k: int | None = None, row_cap: int | None = None) -> PortableSAE:
    """An SAELens folder as a PortableSAE (fp32). ``k`` is needed for threshold architectures."""
    cfg_path, weights_path = path / CONFIG, path / WEIGHTS
    if not path.is_dir() or not cfg_path.exists() or not weights_path.exists():
        raise InteropError(f"{path}: not an SAELens folder (needs {CONFIG} and {WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = {name: t.float() for name, t in load_file(str(weights_path)).items()}
    except (OSError, ValueError) as error:
        raise InteropError(f"{path}: cannot read: {error}") from error
    arch = cfg.get("architecture", "standard")
    known = ["topk", *THRESHOLD_ARCHITECTURES, *RELU_ARCHITECTURES]
    if arch not in known:
        raise InteropError(f"{cfg_path}: architecture {arch!r} cannot be held by sae-engine (TopK and "
                           f"threshold encoders only); readable: {known}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise InteropError(f"{cfg_path}: normalize_activations = {norm!r} depends on each vector (or on "
                           "statistics not in the file): it cannot be folded into weights")
    if cfg.get("reshape_activations", "none") != "none":
        raise InteropError(f"{cfg_path}: reshape_activations = {cfg['reshape_activations']!r} is not supported")
    transcoder = arch != "topk" and {**THRESHOLD_ARCHITECTURES, **RELU_ARCHITECTURES}[arch]
    skip = arch.endswith("skip_transcoder")
    _require(tensors, ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if skip else [])
             + (["threshold"] if arch in THRESHOLD_ARCHITECTURES else []), weights_path)
    W_enc = tensors["W_enc"]
    if W_enc.dim() != 2:
        raise InteropError(f"{weights_path}: W_enc has shape {tuple(W_enc.shape)}, expected [d_in, d_sae]")
    W_enc, b_enc, W_dec = W_enc.T, tensors["b_enc"], tensors["W_dec"]  # engine layout: [n, d_in]
    for key, want in (("d_in", W_enc.shape[1]), ("d_sae", W_enc.shape[0])):
        if key in cfg and cfg[key] != want:
            raise InteropError(f"{path}: {CONFIG} says {key} = {cfg[key]} but W_enc has shape {tuple(tensors['W_enc'].shape)}")
    if not transcoder and cfg.get("apply_b_dec_to_input", True) is False and W_dec.shape[-1] == W_enc.shape[1]:
        # hidden = W_enc x + b_enc = W_enc (x - b_dec) + (b_enc + W_enc b_dec)
        b_enc = b_enc + W_enc @ tensors["b_dec"]
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # hidden * |W_dec_i| selects and scales; decoding divides by |W_dec_i| again.
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    sae = PortableSAE(kind="topk", k=0, W_enc=W_enc.contiguous(), b_enc=b_enc, W_dec=W_dec, b_dec=tensors["b_dec"],
                      transcoder=transcoder, W_skip=tensors.get("W_skip") if skip else None)
    if arch == "topk":
        if "k" not in cfg:
            raise InteropError(f"{cfg_path}: a topk SAE without k")
        if k is not None and k != cfg["k"]:
            raise InteropError(f"{cfg_path}: --k {k} differs from the file's k = {cfg['k']}")
        sae.k = cfg["k"]
    elif arch in THRESHOLD_ARCHITECTURES and not _one_value(tensors["threshold"]):
        _as_jumprelu(sae, tensors["threshold"], k, row_cap, cfg_path)
    else:
        if k is None:
            raise InteropError(f"{cfg_path}: a {arch} SAE has no k; pass --k (the BatchTopK k for further "
                               "training; inference keeps up to --row-cap latents above the threshold)")
        sae.kind, sae.k, sae.row_cap = "batchtopk", k, row_cap
        sae.threshold = max(float(tensors["threshold"][0]), RELU_THRESHOLD) if arch in THRESHOLD_ARCHITECTURES \
            else RELU_THRESHOLD
    sae.check(str(path))
    return sae


def _one_value(threshold: torch.Tensor) -> bool:
    """Whether JumpReLU thresholds [n] are one value for every latent (a BatchTopK SAE's)."""
    return threshold.numel() > 0 and bool(threshold.min() == threshold.max())


def _as_jumprelu(sae: PortableSAE, threshold: torch.Tensor, k: int | None, row_cap: int | None, where: Path) -> None:
    """Make ``sae`` a JumpReLU SAE with per-latent thresholds [n]. SAELens computes
    relu(pre) * (pre > threshold), so a threshold below 0 acts as 0 (kept >= 0 here). row_cap:
    latents a vector keeps at most (needed: the file has none); k: only the default 4k row cap's."""
    if threshold.shape != (sae.n_latents,):
        raise InteropError(f"{where}: threshold has shape {tuple(threshold.shape)}, expected ({sae.n_latents},)")
    if row_cap is None and k is None:
        raise InteropError(f"{where}: a JumpReLU SAE keeps every latent above its threshold; pass --row-cap "
                           "(latents a vector keeps at most; the rest are counted as overflow)")
    sae.kind, sae.thresholds = "jumprelu", threshold.clamp_min(0.0)
    sae.row_cap = row_cap
    sae.k = k if k is not None else max(1, min(row_cap, sae.n_latents) // 4)


def kernel_weights(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc [n, d_in], b_enc [n], W_dec [n, d_out]) of an SAELens folder for ``sae_kernels``.

    W_enc is the transposed view of the stored [d_in, n] matrix (no copy; the CPU path's GEMM
    reads it as it is, the Triton path makes one contiguous copy).
    """
    tensors = load_file(str(Path(path) / WEIGHTS))
    return tensors["W_enc"].T, tensors["b_enc"], tensors["W_dec"]
