"""sae_kernels: fused top-k encoder and sparse decoder kernels for sparse autoencoders.

Shapes: ``x[B, d]``, ``W_enc[n, d]``, ``b_enc[n]``, ``W_dec[n, d]``; a sparse code is
``(values[B, k], indices[B, k])`` with index -1 marking an empty slot.

    >>> import torch, sae_kernels
    >>> x, W = torch.randn(8, 16), torch.randn(100, 16)
    >>> values, indices = sae_kernels.topk_encode(x, W, torch.zeros(100), k=4)
    >>> recon = sae_kernels.sparse_decode(values, indices, W)

Both functions are differentiable (torch autograd), registered as ``torch.library`` custom ops
(``torch.compile`` traces through them), and never build a ``[B, n]`` tensor outside the
``impl="torch"`` reference. ``sae_kernels.jax`` offers the same two functions for JAX.

On a machine without CUDA, importing this package sets ``TRITON_INTERPRET=1`` (unless already
set) so that ``impl="triton"`` runs the real Triton kernels under Triton's interpreter; this
only takes effect if triton was not imported before.
"""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")

from .ops import (  # noqa: E402
    DecodeGrads,
    EncodeGrads,
    RowSparseGrad,
    sparse_decode,
    sparse_decode_backward,
    topk_encode,
    topk_encode_backward,
)
from .reference import EMPTY  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "DecodeGrads",
    "EncodeGrads",
    "RowSparseGrad",
    "sparse_decode",
    "sparse_decode_backward",
    "topk_encode",
    "topk_encode_backward",
]
