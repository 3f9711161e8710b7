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
from typing import Callable

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


def preactivation_buffer(
    rows: int, n: int, dtype: torch.dtype, device: torch.device, purpose: str = "pre"
) -> torch.Tensor:
    """A ``[rows, n]`` view of this thread's reused buffer for (purpose, dtype, device).

    Reused across calls: a fresh 100 MiB tensor every step costs its page faults again
    (measured: ~25 ms a call at B=4096, n=10240 on a 2-core CPU). Grows to the largest request.
    ``purpose`` keeps apart buffers that one call uses at the same time.
    """
    buffers = _workspace.__dict__.setdefault("buffers", {})
    key = (purpose, dtype, device)
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
    valid = indices >= 0
    # Only the valid slots enter the pattern when there are more slots than rows (a rank's part
    # of a wider code: a CSR row cannot hold more entries than the matrix has columns) and when
    # most slots are empty (the per-group codes of prefix_decode's backward), which would
    # otherwise each cost a d-long dot.
    sparse = k > W.shape[0] or 2 * int(valid.sum()) < B * k
    if sparse:
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
    if sparse:
        return torch.zeros(B, k, device=g.device).masked_scatter_(valid, dots.values())
    return dots.values().view(B, k) * valid


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


# ---------------------------------------------------------------------------------------------
# Matryoshka prefix decode and JumpReLU threshold encode.
# ---------------------------------------------------------------------------------------------


def sort_code_by_index(
    values: torch.Tensor, indices: torch.Tensor, boundaries: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of a code ordered by latent index, and where each prefix ends in it.

    -> (values [B, k], indices [B, k] ascending per row, empty slots first; ends [B, G + 1]
    int64: ``ends[b, 0]`` counts the empty slots and ``ends[b, g + 1]`` the slots with index
    below ``m_{g+1}``, so group g of row b is ``ends[b, g] : ends[b, g + 1]``).
    """
    sorted_idx, order = torch.sort(indices, dim=1)
    marks = torch.tensor([0, *boundaries], dtype=sorted_idx.dtype, device=indices.device)
    ends = torch.searchsorted(sorted_idx, marks.expand(indices.shape[0], -1).contiguous())
    return values.gather(1, order), sorted_idx, ends


def prefix_decode(
    values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, boundaries: list[int]
) -> torch.Tensor:
    """Partial reconstructions of every prefix: ``out[g, b] = sum over slots with index < m_g``.

    values, indices: [B, k]; W: [n, d]; boundaries: [m_1 < ... < m_G = n] -> [G, B, d] in
    ``promote_types(values.dtype, W.dtype)``. Rows are sorted by index, so each (row, group)
    is one contiguous bag for embedding_bag; the group sums are added up in fp32 (a cumulative
    sum over groups). Nothing of size [B, n] or [B, k, d] is built.
    """
    B, k = indices.shape
    G, d = len(boundaries), W.shape[1]
    out_dtype = torch.promote_types(values.dtype, W.dtype)
    if B == 0 or k == 0:
        return torch.zeros(G, B, d, dtype=out_dtype, device=W.device)
    svals, sidx, ends = sort_code_by_index(values, indices, boundaries)
    # Bag (b, g) starts at ends[b, g]; row b's empty slots join its first bag with weight 0.
    starts = ends[:, :G].clone()
    starts[:, 0] = 0
    offsets = (starts + torch.arange(0, B * k, k, device=W.device)[:, None]).reshape(-1)
    weights = (svals * (sidx >= 0)).to(W.dtype).reshape(-1)
    parts = F.embedding_bag(sidx.clamp_min(0).reshape(-1), W, offsets, mode="sum", per_sample_weights=weights)
    return parts.view(B, G, d).float().cumsum(dim=1).transpose(0, 1).to(out_dtype).contiguous()


_LANE_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def flat_nonzero(t: torch.Tensor) -> torch.Tensor:
    """Flat positions of the nonzero entries of a contiguous bool or integer tensor, ascending.

    For sparse tensors: scans them as int64 words (8 bools or 4 int16 each), several times
    faster than ``nonzero`` over the elements, then reads the lanes of the words that hit.
    """
    flat = t.view(-1)
    lanes = 8 // t.element_size()
    whole = flat.numel() // lanes * lanes
    if whole == 0 or lanes == 1 or (t.storage_offset() * t.element_size()) % 8:
        return flat.nonzero().squeeze(1)
    words = flat[:whole].view(torch.int64)
    hit = words.nonzero().squeeze(1)
    nz = words.index_select(0, hit).view(_LANE_DTYPES[t.element_size()]).nonzero().squeeze(1)  # lanes in order
    shift = lanes.bit_length() - 1
    pos = (hit.index_select(0, nz >> shift) << shift) | (nz & (lanes - 1))
    if whole < flat.numel():
        pos = torch.cat([pos, flat[whole:].nonzero().squeeze(1) + whole])
    return pos


class _RowLists:
    """Per-row lists of (value, column) in column order, written into ``values [B, cap]`` /
    ``columns [B, cap]`` (pre-filled with 0 / -1), with exact ``counts [B]`` (zeroed by the
    caller). ``exact(values fp32, columns)`` keeps the true entries of a superset of
    candidates; ``offset[m]`` is added to the values.
    """

    def __init__(self, values: torch.Tensor, columns: torch.Tensor, counts: torch.Tensor, m: int,
                 exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 offset: torch.Tensor | None = None) -> None:
        self.values, self.columns, self.counts = values, columns, counts
        self.m, self.exact, self.offset = m, exact, offset

    def place(self, flat: torch.Tensor, picked: torch.Tensor) -> None:
        """Candidates at ascending flat positions of the [B, m] batch (whole rows, none seen
        before) with their fp32 values."""
        rows, cols = flat // self.m, flat % self.m
        if self.exact is not None:
            keep = self.exact(picked, cols).nonzero().squeeze(1)
            rows, cols, picked = rows.index_select(0, keep), cols.index_select(0, keep), picked.index_select(0, keep)
        if self.offset is not None:
            picked = picked + self.offset.index_select(0, cols)
        counts = torch.bincount(rows, minlength=self.counts.numel())
        self.counts += counts
        cap = self.values.shape[1]
        slot = torch.arange(rows.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts).index_select(0, rows)
        keep = (slot < cap).nonzero().squeeze(1)
        target = (rows * cap + slot).index_select(0, keep)
        self.values.view(-1).index_copy_(0, target, picked.index_select(0, keep).to(self.values.dtype))
        self.columns.view(-1).index_copy_(0, target, cols.index_select(0, keep))


class _Candidates:
    """Candidate entries gathered chunk by chunk and handed to row lists once per flush.

    A chunk only keeps what the next GEMM would overwrite: the entries of its bool mask (fp32
    path), or the int64 words of its screened 16-bit buffer that hold a candidate
    (``_screen``; decoded at the flush). The sorting into rows runs after the last chunk, or
    after a chunk that leaves ``budget`` words / entries pending, which bounds the memory:
    fewer small ops per chunk, each of which costs a thread synchronization on the CPU.
    """

    def __init__(self, lists: list[_RowLists], m: int, budget: int, dtype: torch.dtype,
                 offset16: torch.Tensor | None = None) -> None:
        self.lists, self.m, self.budget, self.dtype, self.offset16 = lists, m, budget, dtype, offset16
        self.word_starts: list[torch.Tensor] = []
        self.words: list[torch.Tensor] = []
        self.entries: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.pending = 0

    def add_mask(self, pre: torch.Tensor, mask: torch.Tensor, first_flat: int) -> None:
        """The entries of ``pre`` where the bool ``mask`` is true; flat index 0 of the chunk is
        ``first_flat`` of the batch."""
        flat = flat_nonzero(mask)
        self.entries.append((flat + first_flat, pre.view(-1).index_select(0, flat).float()))
        self._added(flat.numel())

    def add_screened(self, q: torch.Tensor, first_flat: int) -> None:
        """The nonzero lanes of a screened int16 chunk ``q`` (flat index 0 = ``first_flat``)."""
        flat = q.view(-1)
        whole = flat.numel() // 4 * 4
        words = flat[:whole].view(torch.int64)
        hit = words.nonzero().squeeze(1)
        self.word_starts.append(hit * 4 + first_flat)
        self.words.append(words.index_select(0, hit))
        if whole < flat.numel():  # the last lanes, padded with zeros into one more word
            tail = torch.zeros(4, dtype=torch.int16, device=q.device)
            tail[: flat.numel() - whole] = flat[whole:]
            self.word_starts.append(torch.full((1,), first_flat + whole, dtype=torch.int64, device=q.device))
            self.words.append(tail.view(torch.int64))
        self._added(hit.numel())

    def add_entries(self, flat: torch.Tensor, picked: torch.Tensor) -> None:
        """Candidates given directly: flat positions of the batch and their fp32 values."""
        self.entries.append((flat, picked))
        self._added(flat.numel())

    def _added(self, count: int) -> None:
        self.pending += count

    def chunk_done(self) -> None:
        """Flush if ``budget`` is reached (only between chunks: no row spans two flushes)."""
        if self.pending >= self.budget:
            self.flush()

    def flush(self) -> None:
        """Decode the pending candidates, in flat order, into every list."""
        parts = [e[0] for e in self.entries]
        values = [e[1] for e in self.entries]
        mixed = bool(self.entries) and bool(self.words)
        if self.words:
            lanes = torch.cat(self.words).view(torch.int16)
            nz = lanes.nonzero().squeeze(1)
            flat = torch.cat(self.word_starts).index_select(0, nz >> 2) + (nz & 3)
            q = lanes.index_select(0, nz)
            parts.append(flat)
            values.append((q + self.offset16.index_select(0, flat % self.m)).view(self.dtype).float())
        self.word_starts, self.words, self.entries, self.pending = [], [], [], 0
        if not parts:
            return
        flat, picked = torch.cat(parts), torch.cat(values)
        if mixed:  # entries given apart interleave with the decoded words
            flat, order = torch.sort(flat)
            picked = picked.index_select(0, order)
        for row_lists in self.lists:
            row_lists.place(flat, picked)


def _bits_floor(threshold: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """For 16-bit ``dtype``: int16 keys ``f`` with ``p.view(int16) >= f`` true for every ``p``
    of that dtype with ``p > threshold`` (a superset: NaNs pass), or -2**15 where the threshold
    is negative (those latents are listed apart, see ``_screen_offsets``). None for other dtypes.

    Non-negative 16-bit floats order like their bit patterns, and ``p > t`` is ``p >= u`` for u
    the smallest value of the dtype above t: integer arithmetic instead of float compares,
    which are several times slower for mixed or 16-bit operands on the CPU."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    low = threshold.to(dtype)
    low = torch.where(low.float() > threshold, torch.nextafter(low, torch.full_like(low, float("-inf"))), low)
    bits = low.view(torch.int16).to(torch.int32)
    return torch.where(bits >= 0, bits + 1, -(2**15)).clamp(max=2**15 - 1).to(torch.int16)


def _screen_offsets(floor: torch.Tensor) -> torch.Tensor:
    """int16 ``f - 1`` for ``_screen`` from ``_bits_floor`` keys; latents with a negative
    threshold (key -2**15) get 2**15 - 1, which screens everything out (they are listed apart)."""
    return torch.where(floor == -(2**15), 2**15 - 1, floor.to(torch.int32) - 1).to(torch.int16)


def _screen(pre: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Overwrite a 16-bit ``pre[R, m]`` with int16 ``q = max(p, f - 1) - (f - 1)``, nonzero
    exactly where ``p >= f`` (never overflowing, as ``f >= 1`` there), which gives ``p`` back as
    ``q + f - 1``: two vectorized integer passes, where a compare into a bool mask is several
    times slower on the CPU. -> q, a view of ``pre``'s storage."""
    q = pre.view(torch.int16)
    torch.maximum(q, offsets, out=q)
    return q.sub_(offsets)


def threshold_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    cap: int,
    band: float | None,
    band_cap: int,
) -> tuple[torch.Tensor, ...]:
    """Chunked JumpReLU encoder: per chunk of rows, the GEMM into a reused buffer, the compare
    against the threshold, and the compaction of the active latents (ascending index).

    Same outputs as ``reference.threshold_encode_ref``. The GEMM ``x @ W_enc.T`` runs in
    ``gemm_dtype(x.dtype, x.device)`` without the bias, and is compared in fp32 against
    ``threshold - b_enc`` (adding the bias is a pass over the whole chunk; the compare is one
    anyway); the bias is added to the few listed values. A 16-bit GEMM output is screened as
    integers (``_screen``) and the passing entries are checked in fp32. With a band, one
    screen finds the candidates of both lists.
    """
    B, n = x.shape[0], W_enc.shape[0]
    compute = gemm_dtype(x.dtype, x.device)
    W_t = W_enc.to(compute).T
    bias = b_enc.float()
    shifted = threshold.float() - bias  # active: x . w > threshold - b
    dev = x.device
    values = torch.zeros(B, cap, dtype=x.dtype, device=dev)
    indices = torch.full((B, cap), EMPTY, dtype=torch.int64, device=dev)
    counts = torch.empty(B, dtype=torch.int64, device=dev)
    width = band_cap if band is not None else 0
    band_pre = torch.zeros(B, width, device=dev)
    band_idx = torch.full((B, width), EMPTY, dtype=torch.int64, device=dev)
    band_counts = torch.zeros(B, dtype=torch.int64, device=dev)
    rows = rows_per_chunk(n, B, W_t.element_size())
    buffer = preactivation_buffer(rows, n, compute, dev)
    if band is None:
        # Candidates: the active entries (exact for an fp32 GEMM, a superset for a 16-bit one).
        low = shifted
        exact = None if compute == torch.float32 else (lambda v, c: v > shifted.index_select(0, c))
        lists = [_RowLists(values, indices, counts.zero_(), n, exact, bias)]
    else:
        # One candidate set for both lists: x . w > (threshold - b) - band / 2, widened by one
        # ulp for the rounding of that difference; each list then keeps its own exactly.
        half = band / 2
        low = torch.nextafter(shifted - half, torch.tensor(float("-inf"), device=dev))
        lists = [_RowLists(values, indices, counts.zero_(), n, lambda v, c: v > shifted.index_select(0, c), bias),
                 _RowLists(band_pre, band_idx, band_counts, n,
                           lambda v, c: (v - shifted.index_select(0, c)).abs() < half, bias)]
    floor = _bits_floor(low, compute)
    offsets = None if floor is None else _screen_offsets(floor)
    # Pending candidates before a flush: 16 bytes each, a quarter of the chunk buffer's bytes.
    candidates = _Candidates(lists, n, max(rows * n * buffer.element_size() // 64, 1), compute, offsets)
    if floor is None:
        mask_buffer = preactivation_buffer(rows, n, torch.bool, dev, purpose="mask")
    else:
        negative = (floor == -(2**15)).nonzero().squeeze(1)  # usually none
    for start in range(0, B, rows):
        stop = min(start + rows, B)
        pre = buffer[: stop - start]
        torch.mm(x[start:stop].to(compute), W_t, out=pre)
        if floor is None:
            mask = mask_buffer[: stop - start]
            torch.gt(pre, low, out=mask)
            candidates.add_mask(pre, mask, start * n)
        else:
            if negative.numel():  # every entry of these latents is a candidate
                R = stop - start
                flat = (torch.arange(start, stop, device=dev) * n).repeat_interleave(negative.numel())
                candidates.add_entries(flat + negative.repeat(R), pre.index_select(1, negative).reshape(-1).float())
            candidates.add_screened(_screen(pre, offsets), start * n)
        candidates.chunk_done()
    candidates.flush()
    return values, indices, counts, band_pre, band_idx, band_counts
