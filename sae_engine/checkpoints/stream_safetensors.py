"""Write a safetensors file tensor by tensor, chunk by chunk, never holding a tensor whole.

The header (every tensor's dtype, shape and byte range) goes first, then each tensor's bytes in
row order; the file is written under a temporary name and renamed (atomic).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..atomic import atomic_path

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8"}


def write_streamed(out: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                   chunks: Callable[[str], Iterable[torch.Tensor]], metadata: dict[str, str] | None = None) -> Path:
    """Write ``entries`` (key, dtype, shape), in their order, to ``out``.

    chunks(key): the tensor's consecutive row blocks, in ``dtype``, together exactly ``shape``.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for key, dtype, shape in entries:
            written = 0
            for block in chunks(key):
                if block.dtype != dtype:
                    raise ValueError(f"{key}: a chunk of dtype {block.dtype}, expected {dtype}")
                data = block.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                handle.write(data)
                written += len(data)
            if written != header[key]["data_offsets"][1] - header[key]["data_offsets"][0]:
                raise ValueError(f"{key}: chunks of {written} bytes for a tensor of shape {list(shape)} {dtype}")
    return out
