"""One ``model.safetensors``-format file from a sharded checkpoint, streamed chunk by chunk.

The file has the keys and tensors of a single-process checkpoint's ``model.safetensors``. The
header is written first from DCP's metadata (every tensor's shape and dtype); then each
tensor's row chunks, as the ranks saved them, are read one at a time in row order and
appended (``sae_engine.checkpoints.stream_safetensors``). Memory holds one rank's chunk of one tensor,
never the whole SAE.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from .keys import is_model_key
from .meta import DCP
from .stream_safetensors import write_streamed


def _model_entries(folder: Path):
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    tensors = {key: meta for key, meta in sorted(metadata.state_dict_metadata.items())
               if is_model_key(key) and isinstance(meta, TensorStorageMetadata)}
    return metadata, tensors


def read_sharded(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A sharded checkpoint's model tensors, whole, in this one process (for formats that need
    them whole)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from .meta import CheckpointError

    folder = Path(checkpoint) / DCP
    try:
        _, entries = _model_entries(folder)
        state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for key, meta in entries.items()}
        with warnings.catch_warnings():  # one process reading on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(folder)), no_dist=True)
    except CheckpointException as error:  # a BaseException, which `except Exception` would miss
        raise CheckpointError(" ".join(str(error).split())) from None
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(str(error)) from None
    return state


def export_sharded(checkpoint: Path, out: Path, file_metadata: dict[str, str] | None = None) -> Path:
    """Write the model tensors of sharded checkpoint folder ``checkpoint`` to ``out`` (atomically);
    ``file_metadata``: the safetensors header's string metadata."""
    folder = Path(checkpoint) / DCP
    metadata, tensors = _model_entries(folder)

    def chunks(key: str):
        """The rank files' row blocks of ``key``, in row order."""
        for chunk in sorted(tensors[key].chunks, key=lambda c: tuple(c.offsets)):
            info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            with open(folder / info.relative_path, "rb") as part:
                part.seek(info.offset)
                rows = torch.load(io.BytesIO(part.read(info.length)), weights_only=True)
            if tuple(rows.shape) != tuple(chunk.sizes):
                raise ValueError(f"{folder}: chunk of {key} at {list(chunk.offsets)} holds {list(rows.shape)}, "
                                 f"its metadata says {list(chunk.sizes)}")
            yield rows

    entries = [(key, meta.properties.dtype, tuple(meta.size)) for key, meta in tensors.items()]
    return write_streamed(Path(out), entries, chunks, file_metadata)
