"""Chunked PyTorch implementations: the CPU path, and the GPU fallback for very large k.

Nothing here materializes a ``[B, n]`` tensor for the whole batch. The encoder computes the
pre-activations of ``rows_per_chunk`` rows at a time into one reused buffer (reuse avoids the
page faults of fresh large allocations) and selects the top k of each chunk.

Selection works on the floats' bit patterns read as integers (``keys``): for IEEE floats
(sign-magnitude) integer order equals float order over the non-negative values and puts
every negative value below them, and integer reductions vectorize where bf16 ones do not. A
row with fewer than k non-negative pre-activations is selected again in float order. Wide
rows are selected by groups, which reads the chunk once instead of running a selection over
every element:

1. split each row into groups of ``G`` latents and take every group's maximum;
2. keep the ``k`` groups with the largest maxima: the ``k``-th largest group maximum is a lower
   bound on the ``k``-th largest element, so every top-k element lies in one of those groups;
3. select the top k among the ``k * G`` surviving candidates, the same way again.

Values are exact either way; among exactly equal pre-activations at the k-th place, which
index is kept is deterministic but unspecified here (the reference and Triton paths keep the
smaller index).

The GEMM's dtype on the CPU, per hardware class (``gemm_dtype``):

* fp32 inputs: fp32 everywhere.
* bf16 inputs: bf16 on CPUs with bf16 matrix units (AVX-512-BF16, AMX, Arm BF16; read by
  ``sae_kernels.hardware.cpu_info``): there it is 2-6x faster than fp32. Elsewhere (e.g. AVX2
  only, AMD Zen 3) the bf16 product is emulated, about 9x slower than fp32, so each chunk's
  GEMM runs in fp32 on the upcast inputs (bf16 products are exact in fp32).
* fp16 inputs: fp32 on every CPU (the fp16 product is emulated; measured 3.3x slower than fp32
  on an AVX-512-BF16 Zen 4).

Either way the outputs keep the input dtype: values are the selected pre-activations rounded
once to it. An fp32 GEMM selects on fp32 pre-activations, a bf16 GEMM on bf16-rounded ones
(within the bf16 tolerance of the exact top k). ``FP32_GEMM`` overrides the choice.
On CUDA tensors the GEMM runs in the input dtype.
"""
from __future__ import annotations

import threading
import warnings

import torch
import torch.nn.functional as F

from .reference import EMPTY

GROUP_SIZES = (64, 8)  # latents per group, the widest that still leaves enough groups
MIN_GROUPS_PER_K = 4  # measured: with fewer groups per selected latent one topk is faster
CHUNK_BYTES = 32 << 20  # pre-activation buffer size, unless that leaves fewer than MIN_CHUNK_ROWS
MIN_CHUNK_ROWS = 512  # measured: narrower GEMMs are up to 1.4x slower at n=131072
MAX_CHUNK_BYTES = 256 << 20  # ... but never more than this for the sake of MIN_CHUNK_ROWS
# None: decided by the hardware (see the module docstring); True / False: always / never
# compute low-precision GEMMs in fp32 on the CPU.
FP32_GEMM: bool | None = None
_KEY_DTYPES = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


_workspace = threading.local()


def rows_per_chunk(n: int, B: int, element_size: int = 4) -> int:
    """Rows per encoder chunk: those whose ``[rows, n]`` pre-activations fit ``CHUNK_BYTES``,
    or ``MIN_CHUNK_ROWS`` where those fit ``MAX_CHUNK_BYTES``; at least 1, at most B."""
    row_bytes = max(n * element_size, 1)
    wide_rows = min(MIN_CHUNK_ROWS, MAX_CHUNK_BYTES // row_bytes)
    return max(1, min(B, max(CHUNK_BYTES // row_bytes, wide_rows)))


def preactivation_buffer(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[rows, n]`` view of this thread's reused buffer for (dtype, device).

    Reused across calls: a fresh 100 MiB tensor every step costs its page faults again
    (measured: ~25 ms a call at B=4096, n=10240 on a 2-core CPU). Grows to the largest request.
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    flat = buffers.get(key)
    if flat is None or flat.numel() < rows * n:
        flat = buffers[key] = torch.empty(rows * n, dtype=dtype, device=device)
    return flat[: rows * n].view(rows, n)


def group_size(m: int, k: int) -> int:
    """Group width for selecting k of m per row, or 0 when one ``topk`` pass is faster."""
    for G in GROUP_SIZES:
        if m % G == 0 and m // G >= MIN_GROUPS_PER_K * k:
            return G
    return 0


def padded_width(n: int, k: int) -> int:
    """Row width the encoder computes: n, or n rounded up to whole groups when grouping pays."""
    G = GROUP_SIZES[0]
    wide = -(-n // G) * G
    return wide if group_size(wide, k) else n


def _topk_keys(keys: torch.Tensor, k: int, ordered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top k of contiguous integer ``keys[R, m]`` per row. -> (keys [R, k], descending
    when ``ordered``; positions [R, k] int64)."""
    R, m = keys.shape
    G = group_size(m, k)
    if not G:
        return keys.topk(k, dim=1, sorted=ordered)
    groups = keys.view(R * (m // G), G)
    _, chosen = _topk_keys(groups.amax(dim=1).view(R, m // G), k, ordered=False)  # [R, k] group ids
    # Whole groups copied as contiguous rows: no [R, k * G] index arithmetic.
    first_group = torch.arange(0, R * (m // G), m // G, device=keys.device).unsqueeze(1)
    candidates = groups.index_select(0, (chosen + first_group).view(-1)).view(R, k * G)
    top, pos = _topk_keys(candidates, k, ordered)
    return top, chosen.gather(1, pos // G) * G + pos % G


def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``pre[R, m]``. -> (values [R, k] sorted descending, columns [R, k] int64)."""
    key_dtype = _KEY_DTYPES.get(pre.dtype)
    if key_dtype is None:
        return pre.topk(k, dim=1)
    top, columns = _topk_keys(pre.contiguous().view(key_dtype), k)
    values = top.view(pre.dtype)
    short = (top[:, -1] < 0).nonzero().squeeze(1)  # fewer than k non-negative entries
    if short.numel():
        values[short], columns[short] = pre[short].topk(k, dim=1)
    return values, columns


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the encoder's GEMM runs in for inputs of ``dtype`` on ``device``."""
    if dtype == torch.float32 or device.type != "cpu":
        return dtype
    if FP32_GEMM is not None:
        return torch.float32 if FP32_GEMM else dtype
    if dtype == torch.bfloat16:
        from .hardware import cpu_info

        return dtype if cpu_info().native_bf16 else torch.float32
    return torch.float32


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    latent_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked fused-in-spirit top-k encoder. x: [B, d], W_enc: [n, d], b_enc: [n] -> ([B, k], [B, k]).

    The GEMM runs in ``gemm_dtype(x.dtype, x.device)``; selection happens on its output, and
    values are returned in x's dtype.
    """
    B, n = x.shape[0], W_enc.shape[0]
    compute = gemm_dtype(x.dtype, x.device)
    W_enc = W_enc.to(compute)
    bias = b_enc.to(compute)
    if latent_mask is not None:
        # Masked latents get -inf through the bias, so the GEMM itself excludes them.
        bias = bias.masked_fill(~latent_mask.bool(), float("-inf"))
    width = padded_width(n, k)
    if width > n:  # whole groups for the selection: extra latents that are never eligible
        W_enc = torch.cat([W_enc, W_enc.new_zeros(width - n, W_enc.shape[1])])
        bias = torch.cat([bias, bias.new_full((width - n,), float("-inf"))])
    rows = rows_per_chunk(width, B, W_enc.element_size())
    buffer = preactivation_buffer(rows, width, compute, x.device)
    values = torch.empty(B, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(B, k, dtype=torch.int64, device=x.device)
    W_t = W_enc.T
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        pre = buffer[: stop - start]
        torch.addmm(bias, x[start:stop].to(compute), W_t, out=pre)
        top, idx = select_topk(pre, k)
        values[start:stop] = top
        indices[start:stop] = idx
    empty = torch.isneginf(values)
    if width > n:  # NaN inputs make the padding NaN too, and NaN is selected like +inf
        empty |= indices >= n
    indices.masked_fill_(empty, EMPTY)
    values.clamp_(min=0).masked_fill_(empty, 0)
    return values, indices


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_j values[b, j] * W[indices[b, j]]``, empty slots skipped. -> [B, d].

    embedding_bag gathers and sums rows without building the [B, k, d] tensor.
    """
    out_dtype = torch.promote_types(values.dtype, W.dtype)
    weights = (values * (indices >= 0)).to(W.dtype)
    out = F.embedding_bag(indices.clamp_min(0), W, per_sample_weights=weights, mode="sum")
    return out.to(out_dtype)


def gather_dot(g: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``dot(g[b], W[indices[b, j]])`` in fp32, 0 for empty slots. g: [B, d] -> [B, k].

    A sampled matrix product: ``g @ W.T`` evaluated only at the B*k positions of the code
    (a CSR pattern), without gathering a [B, k, d] tensor.
    """
    B, k = indices.shape
    if k > W.shape[0]:
        # More slots than rows (a rank's part of a wider code): a CSR row cannot hold more
        # entries than the matrix has columns, so only the valid slots enter the pattern.
        valid = indices >= 0
        crow = torch.zeros(B + 1, dtype=torch.int64, device=g.device)
        torch.cumsum(valid.sum(dim=1), 0, out=crow[1:])
        columns = indices[valid]
    else:
        crow = torch.arange(0, B * k + 1, k, device=g.device)
        columns = indices.clamp_min(0).reshape(-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, columns, torch.zeros(columns.numel(), device=g.device),
            size=(B, W.shape[0]), check_invariants=False,
        )
        dots = torch.sparse.sampled_addmm(pattern, g.float(), W.float().T, beta=0.0)
    if k > W.shape[0]:
        return torch.zeros(B, k, device=g.device).masked_scatter_(valid, dots.values())
    return dots.values().view(B, k) * (indices >= 0)


def segment_rows(
    coeff: torch.Tensor, indices: torch.Tensor, src: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse-transpose product over the rows that were selected.

    ``grads[u] = sum_{(b, j): indices[b, j] == rows[u]} coeff[b, j] * src[b]`` and
    ``coeff_sums[u] = sum of those coeff``. coeff, indices: [B, k]; src: [B, d] ->
    (rows [U] int64 ascending, grads [U, d] fp32, coeff_sums [U] fp32).
    A CSR matrix [U, B] times src: each output row is summed by one thread in a fixed order,
    so the result is deterministic.
    """
    B, k = indices.shape
    flat = indices.reshape(-1)
    keep = flat >= 0
    flat = flat[keep]
    tokens = torch.arange(B, device=src.device).repeat_interleave(k)[keep]
    weights = coeff.reshape(-1).float()[keep]
    # Unique rows by counting (latent ids are small integers), not by sorting.
    n_bins = int(flat.max()) + 1 if flat.numel() else 0
    counts = torch.bincount(flat, minlength=n_bins)
    present = counts > 0
    rows = present.nonzero().squeeze(1)
    inverse = (torch.cumsum(present, 0) - 1)[flat]
    U = rows.numel()
    order = torch.sort(inverse.int(), stable=True).indices
    crow = torch.zeros(U + 1, dtype=torch.int64, device=src.device)
    torch.cumsum(counts[present], 0, out=crow[1:])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(
            crow, tokens[order], weights[order], size=(U, B), check_invariants=False
        )
        grads = matrix @ src.float()
    coeff_sums = torch.zeros(U, dtype=torch.float32, device=src.device).index_add_(0, inverse, weights)
    return rows, grads, coeff_sums
