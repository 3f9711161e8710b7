"""Interchange with other SAE libraries: SAELens, EleutherAI sparsify, dictionary_learning (InterPLM).

Every conversion goes through ``PortableSAE`` (portable.py): the engine's layout on raw
activations, normalisation folded in. One module per peer reads and writes its files directly
(safetensors / JSON / ``torch.save``), so export and import need none of the peer packages;
the tests load the results with the peers' own loaders.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import dictionary_learning, saelens, sparsify
from .portable import InteropError, PortableSAE, from_run_weights, write_run

FORMATS = {"saelens": saelens, "sparsify": sparsify, "dictionary_learning": dictionary_learning}

__all__ = ["FORMATS", "InteropError", "PortableSAE", "export_run", "import_model", "kernel_weights", "load_model"]


def _format(name: str):
    if name not in FORMATS:
        raise InteropError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def export_run(run_dir: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the latest checkpoint of ``run_dir`` in format ``fmt`` at ``out`` (a new folder)."""
    from ..checkpoints.runs import load_run_weights
    from .portable import check_fresh

    module = _format(fmt)
    out = Path(out)
    check_fresh(out)
    sae = from_run_weights(load_run_weights(run_dir), str(run_dir))
    return module.save(sae, out)


def load_model(path: str | Path, fmt: str, k: int | None = None, row_cap: int | None = None) -> PortableSAE:
    """A peer's checkpoint as a PortableSAE. ``k`` / ``row_cap``: for threshold encoders (ReLU,
    JumpReLU), which carry no k; see the peer modules."""
    module = _format(fmt)
    path = Path(path)
    if not path.exists():
        raise InteropError(f"{path}: no such file or folder")
    return module.load(path, k=k, row_cap=row_cap)


def import_model(path: str | Path, fmt: str, out: str | Path, k: int | None = None,
                 row_cap: int | None = None) -> Path:
    """Convert a peer's checkpoint into a run folder at ``out`` (see ``portable.write_run``)."""
    from .portable import check_fresh

    check_fresh(Path(out))
    sae = load_model(path, fmt, k=k, row_cap=row_cap)
    return write_run(sae, out, {"format": fmt, "path": str(Path(path).resolve())})


def kernel_weights(path: str | Path, fmt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W_enc [n, d_in], b_enc [n], W_dec [n, d_out]) read from a peer's file for ``sae_kernels``,
    as views of the stored tensors (a transposed view where the peer stores [d, n]). These are
    the peer's raw weights: an SAE's encoder input is x - b_dec, as in ``PortableSAE.encode``."""
    return _format(fmt).kernel_weights(Path(path))
