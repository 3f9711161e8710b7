"""Checkpoints: safetensors files plus JSON, written atomically, readable by either backend.

Layout of ``<run>/checkpoints/step_000001234/``:
    model.safetensors   the parameters and normalisation scales (what analysis needs)
    state.safetensors   optimizer moments, latent statistics, the ring buffer's unserved vectors
                        and their stream positions
    meta.json           config, step, tokens seen, RNG and buffer counters, format version
A checkpoint is written into a temporary folder and renamed into place, then ``latest`` (a
one-line file naming it) is replaced atomically, so a crash at any moment leaves the previous
checkpoint intact and ``latest`` always names a complete one.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, write_text

FORMAT_VERSION = 1
MODEL_KEYS_PREFIXES = ("param.", "buffer.in_scale", "buffer.out_scale", "buffer.batchtopk_threshold")


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and point ``latest`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:09d}"
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    model = {name: t for name, t in cpu.items() if name.startswith(MODEL_KEYS_PREFIXES)}
    state = {name: t for name, t in cpu.items() if name not in model}
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(model, str(tmp / "model.safetensors"))
        save_file(state, str(tmp / "state.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True))
    point_latest(final, keep)
    return final


def point_latest(final: Path, keep: int) -> None:
    """Make ``latest`` name the complete checkpoint folder ``final``; keep the newest ``keep``."""
    root = final.parent
    write_text(root / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (model and state together) and meta of a checkpoint folder."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        tensors.update(load_file(str(path / "state.safetensors")))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return tensors, meta

