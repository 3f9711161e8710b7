"""sae_kernels: fused top-k encoder and sparse decoder kernels for sparse autoencoders.

Shapes: ``x[B, d]``, ``W_enc[n, d]``, ``b_enc[n]``, ``W_dec[n, d]``; a sparse code is
``(values[B, k], indices[B, k])`` with index -1 marking an empty slot.

    >>> import torch, sae_kernels
    >>> x, W = torch.randn(8, 16), torch.randn(100, 16)
    >>> values, indices = sae_kernels.topk_encode(x, W, torch.zeros(100), k=4)
    >>> recon = sae_kernels.sparse_decode(values, indices, W)

Both functions are differentiable (torch autograd), run through ``torch.library`` custom ops
(``torch.compile`` traces through them), and never build a ``[B, n]`` tensor outside the
``impl="reference"`` oracle. ``sae_kernels.jax`` offers the same two functions for JAX.

For the other SAE kinds: ``prefix_decode`` gives a Matryoshka SAE's partial reconstructions of
every nested prefix ``[G, B, d]`` in one pass, and ``threshold_encode`` a JumpReLU SAE's code
(active latents per row up to a cap, exact counts, overflow flags, and the pre-activations in
a band around each threshold for its pseudo-gradient). Both exist in ``sae_kernels.jax`` too.

``impl="triton"`` runs the Triton kernels compiled on CUDA tensors and under Triton's
interpreter on CPU tensors, chosen per call; importing this package changes nothing in the
process's environment.
"""
from .ops import (
    DecodeGrads,
    EncodeGrads,
    RowSparseGrad,
    ThresholdCode,
    prefix_decode,
    prefix_decode_backward,
    sparse_decode,
    sparse_decode_backward,
    threshold_encode,
    threshold_encode_backward,
    topk_encode,
    topk_encode_backward,
)
from .reference import EMPTY

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "DecodeGrads",
    "EncodeGrads",
    "RowSparseGrad",
    "ThresholdCode",
    "prefix_decode",
    "prefix_decode_backward",
    "sparse_decode",
    "sparse_decode_backward",
    "threshold_encode",
    "threshold_encode_backward",
    "topk_encode",
    "topk_encode_backward",
]
