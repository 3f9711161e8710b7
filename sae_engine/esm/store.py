"""The activation store: ESM2 vectors on disk as ``.npy`` shards plus a manifest, and a source over it.

A store is written shard by shard (each shard's files atomically, then the manifest, which is
the commit point), so an extraction killed at any moment resumes without missing or repeating
a window. :class:`StoreSource` serves one layer's rows to the trainer's ring buffer.

Under torchrun each rank commits its own shards (named ``r<rank>-<n>``) to its own
``manifest.rank<rank>.json``; when every rank has finished, rank 0 merges them into
``manifest.json`` (:func:`merge_rank_manifests`). Shards are in rank order, so the store order
differs from a one-process run's; each window's vectors are the same (readers go by the index).
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, write_json
from ..data.sources import ShardSource
from .fasta import Window

STORE_FORMAT = 1
_INDEX_FIELDS = ("keys", "ids", "starts", "residues", "offsets", "rows")


class StoreError(ValueError):
    """A store directory is missing, incomplete or was made with different settings."""


def _shard_file(root: Path, name: str, layer: int) -> Path:
    return root / "shards" / f"{name}.L{layer}.npy"


def rank_manifest_path(root: Path, rank: int) -> Path:
    """Where rank ``rank`` of a torchrun extraction commits its shards before the merge."""
    return root / f"manifest.rank{rank}.json"


def _manifest_paths(root: Path) -> list[Path]:
    """The store's manifest (if any) and any per-rank manifests not merged yet."""
    main = root / "manifest.json"
    ranks = sorted(root.glob("manifest.rank*.json"), key=lambda p: int(p.name[len("manifest.rank"):-len(".json")]))
    return ([main] if main.exists() else []) + ranks


def existing_manifest(root: Path) -> dict[str, Any] | None:
    """The header of a store being resumed (its manifest or a rank's), or None for a new store."""
    paths = _manifest_paths(root)
    return json.loads(paths[0].read_text()) if paths else None


def _committed_shards(root: Path) -> list[dict[str, Any]]:
    """Every committed shard, from the manifest and the per-rank manifests, each once, in order."""
    shards: dict[str, dict[str, Any]] = {}
    for path in _manifest_paths(root):
        for shard in json.loads(path.read_text())["shards"]:
            shards.setdefault(shard["name"], shard)
    return list(shards.values())


def merge_rank_manifests(root: Path, world_size: int) -> dict[str, Any]:
    """Rank 0's last step under torchrun: every rank's shards into ``manifest.json``, marked complete.

    Raises StoreError (writing nothing) when a rank of ``world_size`` has not finished. Per-rank
    manifests of an earlier run with more ranks are merged too: their windows were skipped.
    """
    for rank in range(world_size):
        path = rank_manifest_path(root, rank)
        if not path.exists() or not json.loads(path.read_text())["complete"]:
            raise StoreError(f"{path} is missing or incomplete: rank {rank} of {world_size} did not finish its proteins")
    main = root / "manifest.json"
    merged = json.loads(main.read_text()) if main.exists() else json.loads(rank_manifest_path(root, 0).read_text())
    merged["shards"] = _committed_shards(root)
    merged["complete"] = True
    write_json(main, merged)  # the commit point; rank manifests left by a crash here are merged again
    for path in _manifest_paths(root)[1:]:
        path.unlink()
    # files a killed rank left that no rank of this run took up (its rank is beyond world_size)
    _remove_leftovers(root, {shard["name"] for shard in merged["shards"]}, "")
    return merged


def _remove_leftovers(root: Path, committed: set[str], prefix: str) -> None:
    """Delete the files of shards named ``prefix...`` that no manifest lists (a killed writer's)."""
    for path in (root / "shards").iterdir():
        name = path.name.lstrip(".").split(".")[0]
        if name.startswith(prefix) and name not in committed:
            path.unlink()


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
    description and weights sha256; the input's path and content hash; ``precision_resolved``,
    the dtype ESM2 computed in and why; the committed shards in order) and, per shard,
    ``shards/<name>.L<layer>.npy`` ``[rows, d]`` for each layer plus ``shards/<name>.index.json``
    (per window: key, protein id, start residue, residues, row offset in the shard, rows).
    Per-shard indexes keep each commit small for 500k-protein inputs. A shard is committed when
    the manifest lists it; files of uncommitted shards are leftovers of a killed run and are
    removed when a run resumes, so every window appears exactly once.
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
    """What must match for a run to resume a store: settings, weights and input contents (not paths).
    The requested precision is not compared: the resolved one is (see ``extract.store_precision``)."""
    return {
        **{f"settings.{k}": v for k, v in manifest["settings"].items() if k != "precision"},
        "model.weights_sha256": manifest["model"]["weights_sha256"],
        "input.sha256": manifest["input"]["sha256"],
    }


class StoreWriter:
    """Accumulates rows and commits them shard by shard (npy files, index, then manifest).

    ``rank`` (under torchrun): commit to this rank's own manifest and shard names, so ranks never
    write the same file; ``done`` is every window committed by any rank or earlier run.
    """

    def __init__(self, root: Path, header: dict[str, Any], rank: int | None = None) -> None:
        self.root = root
        (root / "shards").mkdir(parents=True, exist_ok=True)
        for path in _manifest_paths(root):
            mine, theirs = _fingerprint(json.loads(path.read_text())), _fingerprint(header)
            if mine != theirs:
                diff = ", ".join(sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))
                raise StoreError(f"{root} was made with different settings ({diff}); use another --out or the same options")
        self.manifest_path = root / "manifest.json" if rank is None else rank_manifest_path(root, rank)
        self.prefix = "" if rank is None else f"r{rank}-"
        committed = _committed_shards(root)
        if self.manifest_path.exists():
            self.manifest = json.loads(self.manifest_path.read_text())
        else:
            self.manifest = {**header, "shards": [], "complete": False}
        if rank is None:  # one process resuming a torchrun store: it takes over the ranks' shards
            self.manifest["shards"] = committed
        self.next_shard = sum(shard["name"].startswith(self.prefix) for shard in committed)
        # files of a shard this writer was killed writing
        _remove_leftovers(root, {shard["name"] for shard in committed}, self.prefix)
        self.done: set[str] = {entry["key"] for entry in _read_index(root, {"shards": committed})}
        self.dtype = np.dtype(header["settings"]["store_dtype"])
        self._reset()

    def _reset(self) -> None:
        self.parts: dict[int, list[np.ndarray]] = {layer: [] for layer in self.manifest["settings"]["layers"]}
        self.table: dict[str, list[Any]] = {k: [] for k in _INDEX_FIELDS}
        self.rows = 0

    def add(self, windows: Sequence[Window], rows: dict[int, torch.Tensor], counts: Sequence[int]) -> None:
        for layer, values in rows.items():
            self.parts[layer].append(values.to("cpu", torch.float32).numpy().astype(self.dtype, copy=False))
        for window, count in zip(windows, counts):
            for key, value in zip(self.table, (window.key, window.id, window.start, len(window.sequence), self.rows, count)):
                self.table[key].append(value)
            self.rows += count
        if self.rows >= self.manifest["settings"]["shard_rows"]:
            self.commit()

    def commit(self) -> None:
        if not self.rows:
            return
        name = f"{self.prefix}{self.next_shard:06d}"
        self.next_shard += 1
        for layer, parts in self.parts.items():
            with atomic_path(_shard_file(self.root, name, layer)) as tmp, tmp.open("wb") as handle:
                np.save(handle, np.concatenate(parts))
        write_json(self.root / "shards" / f"{name}.index.json", self.table)
        self.manifest["shards"].append({"name": name, "rows": self.rows, "windows": len(self.table["keys"])})
        write_json(self.manifest_path, self.manifest)  # the commit point
        self.done.update(self.table["keys"])
        self._reset()

    def finish(self) -> None:
        self.commit()
        self.manifest["complete"] = True
        write_json(self.manifest_path, self.manifest)
        if self.prefix == "":
            for path in _manifest_paths(self.root)[1:]:  # rank manifests taken over above
                path.unlink()



class StoreSource:
    """An activation store's rows for one layer, as an ActivationSource (``d``, ``len``, ``iter_from``).

    For a transcoder, two StoreSources of the same store (input and target layer) are aligned
    row by row and chunk by chunk (same shards, same ``chunk_size``).
    """

    def __init__(self, store: str | Path, layer: int, chunk_size: int = 4096, require_complete: bool = True) -> None:
        self.store = ActivationStore(store)
        if require_complete and not self.store.complete:
            raise StoreError(f"activation store {store} is incomplete; finish it with the same `sae-engine extract` command")
        if not self.store.manifest["shards"]:
            raise StoreError(f"activation store {store} holds no vectors")
        self.layer = layer
        self._shards = ShardSource(self.store.shard_paths(layer), chunk_size=chunk_size)
        self.d = self._shards.d

    random_access = True

    def __len__(self) -> int:
        return len(self._shards)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        return self._shards.iter_from(start)

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """The vectors at ``positions`` [m] (any order), as [m, d]."""
        return self._shards.rows(positions)

