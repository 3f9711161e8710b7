"""One model form every format converts through: an SAE or transcoder on raw activations.

``PortableSAE`` holds fp32 weights in the engine's layout, with the input normalisation already
folded in (no scale), so ``encode`` and ``decode`` here are what every peer computes:
    SAE:        z = TopK(W_enc (x - b_dec) + b_enc);  x_hat = W_dec^T z + b_dec
    transcoder: z = TopK(W_enc x + b_enc);            y_hat = W_dec^T z + b_dec (+ W_skip x)
BatchTopK at inference keeps, among each row's ``row_cap`` largest pre-activations, those at or
above ``threshold`` (a threshold SAE of a peer: JumpReLU with one threshold, or ReLU with a
threshold of the smallest positive float), so it equals a peer's threshold encoder wherever no
row has more than ``row_cap`` latents above the threshold.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import sae_kernels
from sae_kernels import EMPTY

from ..atomic import atomic_path
from ..checkpoints.single import save_checkpoint
from ..config import ConfigError, RunConfig, default_prefixes
from ..checkpoints.export import ExportError
from ..checkpoints.runs import RunWeights

# A ReLU encoder as a threshold encoder: keep every strictly positive pre-activation.
RELU_THRESHOLD = torch.finfo(torch.float32).tiny


# A Matryoshka SAE's prefixes shape its training only: at inference it is the TopK / BatchTopK SAE it trains.
INFERENCE_KINDS = {"matryoshka_topk": "topk", "matryoshka_batchtopk": "batchtopk"}


class InteropError(ExportError):
    """A file or model that cannot be converted as asked; nothing was written."""


@dataclass
class PortableSAE:
    """Shapes: W_enc [n, d_in], b_enc [n], W_dec [n, d_out], b_dec [d_out], W_skip [d_out, d_in]."""

    kind: str  # "topk", "batchtopk" or "jumprelu"
    k: int  # TopK: latents per vector; BatchTopK: the batch budget per vector in training; JumpReLU: unused
    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    transcoder: bool = False
    W_skip: torch.Tensor | None = None
    threshold: float | None = None  # BatchTopK inference threshold
    row_cap: int | None = None  # BatchTopK: candidates per row at inference; JumpReLU: latents kept per row; None = 4k
    thresholds: torch.Tensor | None = None  # JumpReLU: per-latent thresholds [n] (>= 0)
    prefixes: list[int] | None = None  # Matryoshka BatchTopK: the prefix sizes it trained with (inference ignores them)

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def inference_k(self) -> int:
        """Latents each row's selection keeps (BatchTopK: before its threshold)."""
        if self.kind in ("batchtopk", "jumprelu"):
            return min(self.row_cap or 4 * self.k, self.n_latents)
        return self.k

    def check(self, origin: str) -> None:
        """Shapes, k and finiteness; each failure names ``origin`` and the value."""
        n, d_in = self.W_enc.shape if self.W_enc.dim() == 2 else (None, None)
        problems = []
        if self.W_enc.dim() != 2:
            problems.append(f"encoder weight has shape {tuple(self.W_enc.shape)}, expected 2 dimensions")
        elif self.b_enc.shape != (n,):
            problems.append(f"encoder bias has shape {tuple(self.b_enc.shape)}, expected ({n},) for {n} latents")
        if self.W_dec.dim() != 2 or self.W_dec.shape[0] != n:
            problems.append(f"decoder weight has shape {tuple(self.W_dec.shape)}, expected ({n}, d_out) for {n} latents")
        elif self.b_dec.shape != (self.d_out,):
            problems.append(f"decoder bias has shape {tuple(self.b_dec.shape)}, expected ({self.d_out},)")
        if not self.transcoder and self.W_dec.dim() == 2 and self.W_dec.shape[1] != d_in:
            problems.append(f"an SAE's decoder width {self.W_dec.shape[1]} differs from its input width {d_in}")
        if self.W_skip is not None and self.W_dec.dim() == 2 and self.W_skip.shape != (self.d_out, d_in):
            problems.append(f"skip weight has shape {tuple(self.W_skip.shape)}, expected ({self.d_out}, {d_in})")
        if problems:
            raise InteropError(f"{origin}: " + "; ".join(problems))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= n:
            raise InteropError(f"{origin}: k = {self.k!r} cannot run: the kernels need 1 <= k <= n_latents = {n}")
        if self.kind in ("batchtopk", "jumprelu") and not 1 <= self.inference_k <= n:
            raise InteropError(f"{origin}: row cap {self.row_cap!r} cannot run: it must be in 1..{n}")
        if self.kind == "jumprelu" and (self.thresholds is None or self.thresholds.shape != (n,)):
            shape = None if self.thresholds is None else tuple(self.thresholds.shape)
            raise InteropError(f"{origin}: JumpReLU thresholds have shape {shape}, expected ({n},)")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip", "thresholds"):
            t = getattr(self, name)
            if t is not None and not torch.isfinite(t).all():
                raise InteropError(f"{origin}: {name} holds NaN or Inf values")

    # -- the computation every format must reproduce ------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code of raw x [B, d_in]. -> values, indices [B, inference_k] (index -1: none)."""
        x = x.float()
        x_c = x if self.transcoder else x - self.b_dec
        if self.kind == "jumprelu":
            code = self.threshold_code(x)
            return code.values, code.indices
        values, indices = sae_kernels.topk_encode(x_c, self.W_enc, self.b_enc, self.inference_k)
        if self.kind == "batchtopk":
            keep = values >= (self.threshold or 0.0)
            values, indices = values * keep, indices.masked_fill(~keep, EMPTY)
        return values, indices

    def threshold_code(self, x: torch.Tensor) -> sae_kernels.ThresholdCode:
        """A JumpReLU SAE's code of raw x [B, d_in] through ``sae_kernels.threshold_encode``: per row
        the active latents in index order up to the row cap, exact counts and the overflow flags [B]."""
        x = x.float()
        x_c = x if self.transcoder else x - self.b_dec
        return sae_kernels.threshold_encode(x_c, self.W_enc, self.b_enc, self.thresholds, self.inference_k)

    def decode(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Output [B, d_out] of a code; a transcoder with a skip connection also needs x [B, d_in]."""
        out = sae_kernels.sparse_decode(values.float(), indices, self.W_dec) + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip transcoder's output needs its input x")
            out = out + x.float() @ self.W_skip.T
        return out


def _prefixes(model: dict[str, Any]) -> list[int]:
    """A Matryoshka run's prefix sizes from its ``[model]`` table (the default when it sets none)."""
    return list(model.get("matryoshka_prefixes") or default_prefixes(int(model["n_latents"])))


def from_run_weights(weights: RunWeights, origin: str) -> PortableSAE:
    """A run's weights with the dataset normalisation folded in.

    The engine computes on x * in_scale and predicts y * out_scale. With W_enc' = in_scale W_enc,
    b_dec' = b_dec / out_scale, W_dec' = W_dec / out_scale and W_skip' = W_skip in_scale / out_scale
    the same latents (same values) come from raw x and the output comes in raw units. Layer norm
    (per vector: its scale depends on x) folds into no weights.
    """
    m = weights.config["model"]
    if m.get("normalize") == "layernorm":
        raise InteropError(f"{origin}: model.normalize = 'layernorm' normalises each vector by its own mean and "
                           "variance, which no weights can hold and the peer formats do not compute the same way "
                           "(SAELens' layer_norm uses the unbiased std plus eps); export runs trained with "
                           "model.normalize = 'dataset' or 'none'")
    t = weights.tensors
    s_in = float(t["buffer.in_scale"]) if m.get("normalize") == "dataset" else 1.0
    s_out = float(t["buffer.out_scale"]) if m.get("normalize") == "dataset" else 1.0
    transcoder = m.get("d_out") is not None
    W_skip = t.get("param.W_skip")
    k = int(m["k"])
    kind = INFERENCE_KINDS.get(m["kind"], m["kind"])
    cap = m.get("jumprelu_row_cap") if kind == "jumprelu" else m.get("batchtopk_row_cap")
    row_cap = min(cap or 4 * k, int(m["n_latents"]))
    sae = PortableSAE(
        kind=kind, k=k,
        W_enc=t["param.W_enc"].float() * s_in, b_enc=t["param.b_enc"].float().clone(),
        W_dec=t["param.W_dec"].float() / s_out, b_dec=t["param.b_dec"].float() / s_out,
        transcoder=transcoder,
        W_skip=None if W_skip is None else W_skip.float() * (s_in / s_out),
        threshold=float(t["buffer.batchtopk_threshold"]) if kind == "batchtopk" else None,
        row_cap=row_cap if kind in ("batchtopk", "jumprelu") else None,
        thresholds=t["param.threshold"].float().clone() if kind == "jumprelu" else None,
        prefixes=_prefixes(m) if m["kind"] == "matryoshka_batchtopk" else None,
    )
    sae.check(origin)
    return sae


# -- writing results: a fresh path, written whole or not at all ------------------------------------


def check_fresh(out: Path) -> None:
    """Refuse to write over anything: ``out`` must not exist, or be an empty folder."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise InteropError(f"--out {out} already exists; choose a new path (nothing was written)")


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # ints, floats, bools (true/false), strings: TOML reads JSON's spelling


def run_config(sae: PortableSAE, out_dir: Path) -> RunConfig:
    """The run config of an imported model: its shapes and kind, no input normalisation."""
    model: dict[str, Any] = {
        "d_in": sae.d_in, "n_latents": sae.n_latents, "k": sae.k, "kind": sae.kind, "normalize": "none",
    }
    if sae.prefixes is not None:  # continues training as the Matryoshka BatchTopK SAE it was
        model.update(kind="matryoshka_batchtopk", matryoshka_prefixes=list(sae.prefixes))
    if sae.transcoder:
        model["d_out"] = sae.d_out
        model["skip_connection"] = sae.W_skip is not None
    if sae.kind == "batchtopk":
        model["batchtopk_row_cap"] = sae.inference_k
    if sae.kind == "jumprelu":
        model["jumprelu_row_cap"] = sae.inference_k
    try:
        return RunConfig.from_dict({"model": model, "train": {"out_dir": str(out_dir)}}, origin="import")
    except ConfigError as error:
        raise InteropError(str(error)) from error


def write_run(sae: PortableSAE, out_dir: str | Path, imported_from: dict[str, str]) -> Path:
    """A run folder holding ``sae`` as checkpoint step 0, usable like a trained run.

    ``features``, ``enrich`` and the kernels read it as it is; ``sae-engine train --config
    OUT/train.toml`` (plus the data settings) continues training from these weights with a fresh
    optimizer state. ``imported_from`` (format, path) is kept in the checkpoint's meta.json.
    """
    from ..training.torch_backend import TorchSAE

    out_dir = Path(out_dir)
    check_fresh(out_dir)
    config = run_config(sae, out_dir)
    backend = TorchSAE(config, torch.device("cpu"))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            if name in backend.params:
                backend.params[name].copy_(getattr(sae, name))
        if sae.kind == "batchtopk":
            backend.buffers["batchtopk_threshold"].fill_(sae.threshold or 0.0)
        if sae.kind == "jumprelu":
            backend.params["threshold"].copy_(sae.thresholds)
    meta = {"config": config.to_dict(), "step": 0, "tokens": 0, "adam_count": 0, "aux_active": False,
            "imported_from": imported_from}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        save_checkpoint(tmp, 0, backend.state_tensors(), meta)
        (tmp / "config.json").write_text(config.to_json())
        lines = ["# Continue training: sae-engine train --config THIS_FILE --set data.source=... (data settings)\n",
                 "[model]\n"]
        lines += [f"{key} = {_toml_value(value)}\n" for key, value in config.to_dict()["model"].items() if value is not None]
        lines += ["\n[train]\n", f"out_dir = {_toml_value(str(out_dir))}\n"]
        (tmp / "train.toml").write_text("".join(lines))
    return out_dir

