"""One ``model.safetensors``-format file from a sharded checkpoint, streamed chunk by chunk.

The file has the keys and tensors of a single-process checkpoint's ``model.safetensors``. The
header is written first from DCP's metadata (every tensor's shape and dtype); then each
tensor's row chunks, as the ranks saved them, are read one at a time in row order and
appended. Memory holds one rank's chunk of one tensor, never the whole SAE.
"""
from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from ..checkpoint import MODEL_KEYS_PREFIXES

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}


def export_sharded(checkpoint: Path, out: Path) -> Path:
    """Write the model tensors of sharded checkpoint folder ``checkpoint`` to ``out`` (atomically)."""
    folder = Path(checkpoint) / "dcp"
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    tensors = {key: meta for key, meta in sorted(metadata.state_dict_metadata.items())
               if key.startswith(MODEL_KEYS_PREFIXES) and isinstance(meta, TensorStorageMetadata)}
    header, offset = {}, 0
    for key, meta in tensors.items():
        size = meta.properties.dtype.itemsize * int(torch.Size(meta.size).numel())
        header[key] = {"dtype": _DTYPES[meta.properties.dtype], "shape": list(meta.size), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, meta in tensors.items():
            for chunk in sorted(meta.chunks, key=lambda c: tuple(c.offsets)):
                info = metadata.storage_data[MetadataIndex(key, chunk.offsets)]
                with open(folder / info.relative_path, "rb") as part:
                    part.seek(info.offset)
                    rows = torch.load(io.BytesIO(part.read(info.length)), weights_only=True)
                if tuple(rows.shape) != tuple(chunk.sizes):
                    raise ValueError(f"{folder}: chunk of {key} at {list(chunk.offsets)} holds {list(rows.shape)}, "
                                     f"its metadata says {list(chunk.sizes)}")
                handle.write(rows.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)
    return out
