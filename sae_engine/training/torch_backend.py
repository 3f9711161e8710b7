"""The PyTorch backend: parameters, the training step with a hand-written sparse backward, Adam.

Model (all shapes in latents n, input width d_in, target width d_out):
    W_enc [n, d_in], b_enc [n], W_dec [n, d_out] (unit-norm rows), b_dec [d_out],
    W_skip [d_out, d_in] for transcoders with a skip connection.
    SAE:        z = TopK(W_enc (x - b_dec) + b_enc);  x_hat = W_dec^T z + b_dec
    transcoder: z = TopK(W_enc x + b_enc);            y_hat = W_dec^T z + b_dec (+ W_skip x)
Losses: FVU (squared error over the target's total variance); AuxK on dead latents (reconstruct
the residual with the top ``k_aux`` dead latents, Gao et al. 2024; zero when none is dead);
optional Multi-TopK at 4k. Code widths, constants and the rest of the contract:
``sae_engine.training.backend``. BatchTopK keeps the top B*k pre-activations of the batch,
chosen among each row's top ``row_cap`` candidates, so no [B, n] tensor is built. Matryoshka
models decode every prefix of the dictionary in one ``sae_kernels.prefix_decode`` pass
([G, B, d_out]) and differentiate it with ``prefix_decode_backward``; a process holding the
latent rows [lo, hi) decodes its part of each prefix (``backend.local_prefixes``), and the
parts are summed over the latent rows like the plain partial reconstructions. JumpReLU codes
come from ``sae_kernels.threshold_encode`` over this process's rows (its own active latents),
with the band around each threshold for the threshold's pseudo-gradient (``_threshold_grad``).

The backward is written out by hand from ``sae_kernels`` primitives, so weight gradients come
out row-sparse (only the rows a batch touched) and both optimizer modes share one code path.

One step serves one process and a process of a data x latent mesh alike: everything in it that
crosses processes when the batch rows or the latent rows are split over several (selection over
all latents, decoding, sums over the batch, the gradients' sum over data ranks, the global norm,
the firing of the whole batch) goes through a ``StepSplit``. The default, ``OneProcess``, is the
plain computation; ``sae_engine.parallel.torch_sharded`` gives a mesh's.
"""
from __future__ import annotations

from typing import Protocol

import torch

import sae_kernels
from sae_kernels import EMPTY, RowSparseGrad

from ..config import RunConfig
from .backend import (AUX_VARIANCE_FLOOR, BATCHTOPK_THRESHOLD_RATE, JUMPRELU_INIT_THRESHOLD, LAYER_NORM_EPS,
                      MULTI_TOPK_WEIGHT, ROW_NORM_FLOOR, code_width, latent_fractions, local_prefixes,
                      matryoshka_loss_weights, selection_width)
from .init import geometric_median, initial_weights, layer_normalize, mean_squared_norm_scale
from .optim import Adam
from .precision import resolve_precision

Grads = dict[str, torch.Tensor | RowSparseGrad]  # by parameter name: see TorchSAE._backward


def _pad_to(t: torch.Tensor, width: int, value: float | int) -> torch.Tensor:
    """Pad [B, k] on the right to [B, width]."""
    if t.shape[1] == width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


class PrefixMap:
    """The Matryoshka prefixes of a holder of latent rows [lo, hi) (``backend.local_prefixes``):
    its own ``prefix_decode`` boundaries and how its G' partial reconstructions map onto the
    model's G prefixes (identity when it holds every latent)."""

    def __init__(self, prefixes: list[int], lo: int, hi: int) -> None:
        self.local, self.group_map = local_prefixes(prefixes, lo, hi)
        self.identity = self.group_map == list(range(len(self.local)))

    def expand(self, part: torch.Tensor) -> torch.Tensor:
        """part [G', B, d] of the local prefixes -> [G, B, d] of the model's (zeros where the
        prefix holds none of these rows)."""
        if self.identity:
            return part
        index = torch.tensor(self.group_map, device=part.device) + 1
        return torch.cat([part.new_zeros((1,) + part.shape[1:]), part]).index_select(0, index)

    def contract(self, grad: torch.Tensor) -> torch.Tensor:
        """A cotangent [G, B, d] of the model's prefixes -> [G', B, d] of the local ones (``expand``'s transpose)."""
        if self.identity:
            return grad
        index = torch.tensor(self.group_map, device=grad.device)
        keep = index >= 0
        out = grad.new_zeros((len(self.local),) + grad.shape[1:])
        return out.index_add_(0, index[keep], grad[keep])

    def whole(self, grad: torch.Tensor) -> torch.Tensor:
        """A cotangent [B, d] of the whole reconstruction as one [G', B, d] of the local prefixes
        (on the last: the suffix sum gives it to every latent)."""
        out = grad.new_zeros((len(self.local),) + grad.shape)
        out[-1] = grad
        return out


def _kernel_impl(device: torch.device) -> str:
    """The ``sae_kernels`` implementation ``impl="auto"`` picks on ``device``, for its raw ops."""
    return "triton" if device.type == "cuda" else "chunked"


def _stack_codes(codes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate sparse codes along the batch, padding to a common k with empty slots."""
    width = max(v.shape[1] for v, _ in codes)
    values = torch.cat([_pad_to(v.float(), width, 0.0) for v, _ in codes])
    indices = torch.cat([_pad_to(i, width, EMPTY) for _, i in codes])
    return values, indices


class StepSplit(Protocol):
    """What crosses processes in a step when the batch rows or the latents are split.

    A process holds B rows of a batch of N and the latent rows [lo, hi) of the model's
    ``n_latents``; a code's indices are global latent ids.
    """

    lo: int
    hi: int

    def select(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
               row_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``topk_encode`` over the latents of every process. x: [B, d]; W_enc [m, d], b_enc [m]:
        the rows row_ids [m] (ascending, local) of this process's rows (None: all of them).
        -> values [B, k] in x's dtype, global indices [B, k]."""

    def decode_sum(self, values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """``sparse_decode`` of a code [B, k] with global indices over every process's decoder
        rows (W_dec: this process's). -> [B, d] fp32."""

    def owned(self, indices: torch.Tensor) -> torch.Tensor:
        """Global indices [B, k] as this process's local rows; EMPTY where another owns them."""

    def latent_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes holding the other latents of the same batch rows."""

    def gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        """t [B, ...] of this process's batch rows -> [N, ...] those of the whole batch."""

    def batch_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of t [B, ...] over the whole batch. -> 0-d."""

    def batch_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of t [B] over the whole batch. -> 0-d."""

    def total_variance(self, y: torch.Tensor) -> torch.Tensor:
        """Squared deviation of y [B, d] from the batch mean, summed over the whole batch. -> 0-d."""

    def sum_gradients(self, grads: Grads, allow_dense: bool) -> Grads:
        """The gradients of this process's rows summed over the processes holding the other
        batch rows. allow_dense: whether row-sparse sums may come back with every row."""


class OneProcess:
    """The ``StepSplit`` of a model and batch held whole by one process."""

    def __init__(self, n_latents: int) -> None:
        self.lo, self.hi = 0, n_latents

    def select(self, x, W_enc, b_enc, k, row_ids=None):
        values, indices = sae_kernels.topk_encode(x, W_enc, b_enc, k)
        if row_ids is not None:
            indices = torch.where(indices >= 0, row_ids[indices.clamp_min(0)], EMPTY)
        return values, indices

    def decode_sum(self, values, indices, W_dec):
        return sae_kernels.sparse_decode(values, indices, W_dec).float()

    def owned(self, indices):
        return indices

    def latent_sum(self, t):
        return t

    def gather_batch(self, t):
        return t

    def batch_sum(self, t):
        return t.sum()

    def batch_mean(self, t):
        return t.mean()

    def total_variance(self, y):
        return (y - y.mean(dim=0)).pow(2).sum()

    def sum_gradients(self, grads, allow_dense):
        return grads


class TorchSAE:
    """A TopK / BatchTopK SAE or transcoder with its optimizer state (``SAEBackend`` and
    ``SAEAnalysis`` of ``sae_engine.training.backend``): the whole model on one device, or the
    latent rows [lo, hi) of a model split over processes as its ``StepSplit`` says.

    ``config.model`` is always the whole model (code widths, AuxK's k and the statistics follow
    its ``n_latents``); ``n_rows`` = hi - lo is how many latent rows this process holds, the
    first axis of W_enc, b_enc, W_dec and their moments (the firing statistics have one slot more).
    """

    def __init__(self, config: RunConfig, device: torch.device, precision: str | None = None,
                 split: StepSplit | None = None) -> None:
        """``precision``: the compute dtype, "bf16" or "fp32"; None = ``config.train.precision``
        decided for ``device`` (``sae_engine.training.precision``). ``split``: how the step's batch and
        latents are spread over processes (None: ``OneProcess``); this process draws and holds
        the initial rows [split.lo, split.hi) of the whole model's (``init.initial_weights``)."""
        m = config.model
        self.config = config
        self.device = device
        self.split: StepSplit = split or OneProcess(m.n_latents)
        self.n_rows = self.split.hi - self.split.lo
        self.precision = precision or resolve_precision(config.train.precision, device.type).dtype
        self.compute_dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        weights = initial_weights(m, config.train.seed, self.split.lo, self.split.hi)
        d_in, d_out = m.d_in, m.target_dim
        self.params: dict[str, torch.Tensor] = {
            "W_enc": weights["W_enc"],
            "b_enc": torch.zeros(self.n_rows),
            "W_dec": weights["W_dec"],
            "b_dec": torch.zeros(d_out),
        }
        if m.skip_connection:
            self.params["W_skip"] = torch.zeros(d_out, d_in)
        if m.kind == "jumprelu":
            self.params["threshold"] = torch.full((self.n_rows,), JUMPRELU_INIT_THRESHOLD)
        self.params = {name: p.to(device) for name, p in self.params.items()}
        self.buffers: dict[str, torch.Tensor] = {
            # Tokens since each latent last fired; the last slot absorbs empty and zero-valued slots.
            "since_fired": torch.zeros(self.n_rows + 1, dtype=torch.int64, device=device),
            "fire_count": torch.zeros(self.n_rows + 1, dtype=torch.int64, device=device),
            "in_scale": torch.ones((), device=device),
            "out_scale": torch.ones((), device=device),
            "batchtopk_threshold": torch.zeros((), device=device),
        }
        self.optimizer = Adam(self.params, config.train.adam_b1, config.train.adam_b2, config.train.adam_eps)
        self.prefix_map = PrefixMap(m.prefixes, self.split.lo, self.split.hi) if m.is_matryoshka else None
        self._dense_grads: dict[str, torch.Tensor] = {}
        # Whether any latent may be dead: refreshed by the loop at log steps (no latent can be
        # dead before dead_tokens have passed), so steps without dead latents skip AuxK entirely.
        self.aux_active = False

    @property
    def adam_count(self) -> int:
        return self.optimizer.count

    # -- initialisation ----------------------------------------------------------------------

    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent init from a sample: normalisation scales and b_dec. x: [N, d_in], y: [N, d_out]
        (split over latents: every process holds the whole sample and gets the same results)."""
        m = self.config.model
        if m.normalize == "dataset":
            self.buffers["in_scale"].fill_(mean_squared_norm_scale(x))
            self.buffers["out_scale"].fill_(mean_squared_norm_scale(y) if m.is_transcoder else self.buffers["in_scale"].item())
        target = self._normalize_target(y.to(self.device))
        if m.b_dec_init == "geometric_median":
            self.params["b_dec"].copy_(geometric_median(target))
        elif m.b_dec_init == "mean":
            self.params["b_dec"].copy_(target.mean(dim=0))

    # -- forward pieces ------------------------------------------------------------------------

    def _normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw inputs x [B, d_in] in the model's normalised space. -> xn [B, d_in] fp32."""
        if self.config.model.normalize == "layernorm":
            return layer_normalize(x)
        return x.float() * self.buffers["in_scale"]

    def _normalize_target(self, y: torch.Tensor) -> torch.Tensor:
        """Raw targets y [B, d_out] in the model's normalised space. -> yn [B, d_out] fp32."""
        if self.config.model.normalize == "layernorm":
            return layer_normalize(y)
        return y.float() * self.buffers["out_scale"]

    def _encoder_input(self, xn: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: xn [B, d_in] less b_dec for an SAE, xn for a transcoder. -> x_c [B, d_in]."""
        return xn if self.config.model.is_transcoder else xn - self.params["b_dec"]

    def _compute_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W_enc [r, d_in], b_enc [r] and W_dec [r, d_out] (this process's rows) in the compute dtype."""
        cd = self.compute_dtype
        return self.params["W_enc"].to(cd), self.params["b_enc"].to(cd), self.params["W_dec"].to(cd)

    def _batch_topk(self, values: torch.Tensor, indices: torch.Tensor,
                    training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchTopK on per-row candidates values, indices [B, w]: in training keep the N*k largest
        values of the whole batch of N rows (and move the inference threshold towards the smallest
        kept positive value), at inference those at or above the threshold. Dropped slots become 0 / EMPTY."""
        threshold = self.buffers["batchtopk_threshold"]
        if training:
            every = self.split.gather_batch(values.float()).flatten()  # [N * w]
            budget = min(every.numel() // values.shape[1] * self.config.model.k, every.numel())
            cutoff = every.topk(budget, sorted=False).values.min()
            # The inference threshold: running mean of the smallest kept positive value.
            smallest = torch.where((every >= cutoff) & (every > 0), every, torch.inf).min()
            threshold.lerp_(torch.where(torch.isfinite(smallest), smallest, threshold), BATCHTOPK_THRESHOLD_RATE)
            keep = values.float() >= cutoff
        else:
            keep = values.float() >= threshold
        return values * keep, indices.masked_fill(~keep, EMPTY)

    def _dead_latents(self) -> torch.Tensor:
        """This process's rows of latents that have not fired for more than ``model.dead_tokens``
        tokens. -> [m] int64 local rows, ascending."""
        return torch.nonzero(self.buffers["since_fired"][: self.n_rows] > self.config.model.dead_tokens).squeeze(1)

    def _encode(self, x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, training: bool):
        """Sparse code of the encoder input, in the compute dtype. -> values, indices [B, w]:
        w = ``selection_width`` in training (the Multi-TopK code's first k slots are the main
        code), ``code_width`` at inference."""
        m = self.config.model
        if m.kind == "jumprelu":
            code = self._threshold_code(x_c, W_enc, b_enc, band=False)
            return code.values, code.indices
        width = selection_width(m) if training else code_width(m)
        values, indices = self.split.select(x_c.to(self.compute_dtype), W_enc, b_enc, width)
        if m.batch_selection:
            values, indices = self._batch_topk(values, indices, training)
        return values, indices

    def _threshold_code(self, x_c: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                        band: bool) -> sae_kernels.ThresholdCode:
        """JumpReLU code of this process's rows: ``threshold_encode`` with ``row_cap`` slots, its
        values and indices [B, row_cap] with global indices; band (training): also the band of
        width ``jumprelu_bandwidth`` around each threshold, its indices [B, row_cap] local rows."""
        m = self.config.model
        code = sae_kernels.threshold_encode(x_c.to(self.compute_dtype), W_enc, b_enc, self.params["threshold"],
                                            m.row_cap, band=m.jumprelu_bandwidth if band else None)
        if self.split.lo:
            code = code._replace(indices=torch.where(code.indices >= 0, code.indices + self.split.lo, EMPTY))
        return code

    def _threshold_grad(self, code: sae_kernels.ThresholdCode, g_recon: torch.Tensor,
                        batch: torch.Tensor) -> torch.Tensor:
        """The rectangle-kernel pseudo-gradient of the loss w.r.t. this process's thresholds [r]:
        over the band entries (b, i), -(1/eps) (theta_i dL/dv_bi + l0_coef / N), with
        dL/dv_bi = g_recon[b] . W_dec[i] (g_recon [B, d_out]: the gradient w.r.t. the
        prediction) and N = ``batch``, the whole batch's rows (0-d)."""
        m = self.config.model
        W_dec = self.params["W_dec"]
        band = code.band_indices
        dv = torch.ops.sae_kernels.gather_dot(g_recon.contiguous(), band, W_dec, _kernel_impl(W_dec.device))  # [B, w]
        live = band >= 0
        theta = self.params["threshold"][band.clamp_min(0)]
        coeff = (theta * dv + m.l0_coef / batch) * (-1.0 / m.jumprelu_bandwidth)
        return torch.zeros_like(self.params["threshold"]).index_add_(0, band[live], coeff[live])

    def _decode(self, values, indices, W_dec, xn) -> torch.Tensor:
        """Prediction in the normalised target space. -> [B, d_out] fp32."""
        return self._finish(self.split.decode_sum(values.to(W_dec.dtype), indices, W_dec), xn)

    def _finish(self, decoded: torch.Tensor, xn: torch.Tensor) -> torch.Tensor:
        """decoded [..., B, d_out] plus b_dec (and the skip connection of xn [B, d_in])."""
        out = decoded + self.params["b_dec"]
        if "W_skip" in self.params:
            out = out + xn @ self.params["W_skip"].T
        return out

    def _prefix_predictions(self, values, indices, W_dec, xn) -> torch.Tensor:
        """The prediction of every Matryoshka prefix from a code [B, w] with global indices, in
        the normalised target space: one ``prefix_decode`` of this process's rows, summed over
        the latent rows. -> [G, B, d_out] fp32 (the last: ``_decode``'s)."""
        pm = self.prefix_map
        part = sae_kernels.prefix_decode(values.to(W_dec.dtype), self.split.owned(indices), W_dec, pm.local)
        return self._finish(self.split.latent_sum(pm.expand(part.float())), xn)

    # -- inference -----------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference code of raw x [B, d_in]. -> values [B, w] fp32, indices [B, w] int64."""
        xn = self._normalize_input(x.to(self.device))
        W_enc, b_enc, _ = self._compute_weights()
        values, indices = self._encode(self._encoder_input(xn), W_enc, b_enc, training=False)
        return values.float(), indices

    @torch.no_grad()
    def decode(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction from a code [B, w] of raw x [B, d_in], in the target's raw scale. -> [B, d_out] fp32."""
        m = self.config.model
        if m.normalize == "layernorm" and m.is_transcoder:
            raise ValueError("a transcoder with model.normalize = 'layernorm' predicts normalised targets; "
                             "their raw scale is unknown")
        x = x.to(self.device).float()
        _, _, W_dec = self._compute_weights()
        out = self._decode(values.to(self.device), indices.to(self.device), W_dec, self._normalize_input(x))
        if m.normalize == "layernorm":  # undo the per-vector normalisation with x's own statistics
            std = x.var(dim=1, unbiased=False, keepdim=True).add(LAYER_NORM_EPS).sqrt()
            return out * std + x.mean(dim=1, keepdim=True)
        return out / self.buffers["out_scale"]

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """An SAE's reconstruction of raw x [B, d_in], in x's own scale. -> [B, d_in] fp32."""
        if self.config.model.is_transcoder:
            raise ValueError("a transcoder predicts another layer; reconstruct() is for SAEs (use decode())")
        return self.decode(*self.encode(x), x)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """FVU and L0 on held-out data (no training-time BatchTopK statistics); split over
        latents, every process holds the whole x [B, d_in], y [B, d_out]."""
        xn, yn = self._normalize_input(x.to(self.device)), self._normalize_target(y.to(self.device))
        W_enc, b_enc, W_dec = self._compute_weights()
        values, indices = self._encode(self._encoder_input(xn), W_enc, b_enc, training=False)
        recon = self._decode(values, indices, W_dec, xn)
        total_variance = (yn - yn.mean(dim=0)).pow(2).sum()
        return {
            "eval_fvu": ((recon - yn).pow(2).sum() / total_variance).item(),
            "eval_l0": self._row_l0(values).mean().item(),
        }

    def _row_l0(self, values: torch.Tensor) -> torch.Tensor:
        """Active latents of each row of a code [B, w] of the whole model. -> [B] fp32 (a JumpReLU
        code split over latent rows holds each process's own latents: summed over them)."""
        l0 = (values > 0).sum(dim=1).float()
        return self.split.latent_sum(l0) if self.config.model.kind == "jumprelu" else l0

    # -- the training step -----------------------------------------------------------------------

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, torch.Tensor]:
        """One step of forward, sparse backward and Adam on this process's batch rows
        x [B, d_in], y [B, d_out]: the gradients summed over the batch, clipped by their global
        norm, the optimizer step, the firing statistics of the whole batch.

        Returns metrics as 0-d tensors so the caller decides when to synchronise.
        """
        metrics, grads, (values, indices) = self.loss_and_grads(x, y)
        grads = self.split.sum_gradients(grads, allow_dense=self.config.train.optimizer == "adam")
        self._apply_gradients(grads, lr, self._clip_factor(grads))
        fired = self.split.owned(self.split.gather_batch(torch.where(values > 0, indices, EMPTY)))
        self._track_firing(fired, fired.shape[0])
        return metrics

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], Grads, tuple]:
        """Forward and sparse backward without touching the parameters. x: [B, d_in], y: [B, d_out].

        Returns (metrics over the whole batch, grads by parameter name (``_backward``'s; sums
        over this process's batch rows), the main code (values, global indices) [B, k]).
        """
        m = self.config.model
        k = m.k
        xn, yn = self._normalize_input(x), self._normalize_target(y)
        x_c = self._encoder_input(xn)
        W_enc, b_enc, W_dec = self._compute_weights()

        code = None
        if m.kind == "jumprelu":
            code = self._threshold_code(x_c, W_enc, b_enc, band=True)
            values, indices = code.values, code.indices
        else:
            values, indices = self._encode(x_c, W_enc, b_enc, training=True)
        main_values, main_indices = (values[:, :k], indices[:, :k]) if m.multi_topk else (values, indices)
        total_variance = self.split.total_variance(yn)
        # Gradients of each reconstruction term w.r.t. its output: (coefficient source, code);
        # a Matryoshka model's main term has one per prefix, [G, B, d_out].
        if m.is_matryoshka:
            errors = self._prefix_predictions(main_values, main_indices, W_dec, xn) - yn
            weights = matryoshka_loss_weights(m)
            fvus = [self.split.batch_sum(e.pow(2)) / total_variance for e in errors]
            loss = sum(w * f for w, f in zip(weights, fvus))
            error, fvu = errors[-1], fvus[-1]
            scale = torch.tensor(weights, device=self.device).mul_(2).view(-1, 1, 1)
            g_recon = errors * (scale / total_variance)
        else:
            error = self._decode(main_values, main_indices, W_dec, xn) - yn
            fvu = self.split.batch_sum(error.pow(2)) / total_variance
            loss = fvu
            g_recon = error * (2 / total_variance)
        dec_terms = [(g_recon, main_values, main_indices, True)]
        overflow = torch.zeros((), device=self.device)
        if code is not None:  # JumpReLU: the L0 penalty (exact counts, over the cap too)
            counts = self.split.latent_sum(code.counts.float())
            loss = loss + m.l0_coef * self.split.batch_mean(counts)
            overflow = self.split.batch_mean((self.split.latent_sum(code.overflow.float()) > 0).float())
        if m.multi_topk:
            error_multi = self._decode(values, indices, W_dec, xn) - yn
            loss = loss + self.split.batch_sum(error_multi.pow(2)) / total_variance * MULTI_TOPK_WEIGHT
            dec_terms.append((error_multi * (2 / total_variance * MULTI_TOPK_WEIGHT), values, indices, True))
        aux_loss = torch.zeros((), device=self.device)
        dead = self._dead_latents() if self.aux_active and m.aux_coef > 0 else None
        total_dead = 0 if dead is None else int(self.split.latent_sum(torch.tensor([len(dead)], device=self.device)).item())
        if total_dead:
            # The AuxK GEMM runs over the dead rows only: its cost scales with how many are dead.
            aux_values, aux_indices = self.split.select(
                x_c.to(self.compute_dtype), W_enc[dead], b_enc[dead], min(m.aux_k, total_dead), dead
            )
            aux_recon = self.split.decode_sum(aux_values, aux_indices, W_dec)
            residual = error.detach()
            residual_variance = self.split.total_variance(residual).clamp_min(AUX_VARIANCE_FLOOR)
            aux_error = aux_recon - residual
            aux_loss = self.split.batch_sum(aux_error.pow(2)) / residual_variance
            loss = loss + m.aux_coef * aux_loss
            dec_terms.append((aux_error * (2 * m.aux_coef / residual_variance), aux_values, aux_indices, False))

        own = self.split.owned
        grads = self._backward(xn, x_c, values, own(indices), [(g, v, own(i), shared) for g, v, i, shared in dec_terms])
        if code is not None:
            rows = self.split.batch_sum(x.new_ones(x.shape[0], dtype=torch.float32))  # N: the whole batch
            grads["threshold"] = self._threshold_grad(code, g_recon, rows)
        metrics = {
            "loss": loss,
            "fvu": fvu,
            "aux_loss": aux_loss,
            "l0": self.split.batch_mean(self._row_l0(main_values)),
            "overflow": overflow,
        }
        return metrics, grads, (main_values, main_indices)

    def _backward(self, xn: torch.Tensor, x_c: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  dec_terms: list) -> Grads:
        """Sparse backward through every reconstruction term, then the encoder. -> grads by name:
        W_enc (RowSparseGrad [U, d_in] with b_enc's), W_dec (RowSparseGrad [U', d_out], its
        component along each row removed), b_dec [d_out], W_skip [d_out, d_in] when there is one.

        xn, x_c: [B, d_in] the normalised and the encoder input; values, indices: [B, w] the
        shared code (local rows of this process; EMPTY slots are skipped). dec_terms: (gradient
        w.r.t. the term's output [B, d_out] (Matryoshka's main term: [G, B, d_out], one per
        prefix), its values, its indices, whether it reads the shared code). The main and
        Multi-TopK terms read the shared code (main its first k slots), the AuxK term its own.
        b_dec's gradient includes the encoder's ``-sum(dx)`` for an SAE. JumpReLU's threshold
        gradient is ``_threshold_grad``'s.
        """
        B = xn.shape[0]
        grads: Grads = {}
        # b_dec and W_skip enter the main and Multi-TopK reconstructions (every prefix), not the AuxK one.
        g_shared_out = sum(g.sum(dim=0) if g.dim() == 3 else g for g, _, _, shared in dec_terms if shared)
        grads["b_dec"] = g_shared_out.sum(dim=0)
        if "W_skip" in self.params:
            grads["W_skip"] = g_shared_out.T @ xn
        # Decoder: all terms stacked along the batch, one gather-dot and one segmented reduction.
        dec_values, dec_indices = _stack_codes([(v, idx) for _, v, idx, _ in dec_terms])
        # The backward reads the fp32 master weights: as fast here, and more exact.
        if self.prefix_map is None:
            sources = torch.cat([g for g, _, _, _ in dec_terms])
            dec = sae_kernels.sparse_decode_backward(sources, dec_values, dec_indices, self.params["W_dec"])
        else:  # per-prefix cotangents [G', B, d] of this process's prefixes; whole-code terms on the last
            pm = self.prefix_map
            sources = torch.cat([pm.contract(g) if g.dim() == 3 else pm.whole(g) for g, _, _, _ in dec_terms], dim=1)
            dec = sae_kernels.prefix_decode_backward(sources, dec_values, dec_indices, self.params["W_dec"], pm.local)
        grads["W_dec"] = self._remove_parallel(dec.W_dec)
        # Encoder: gradients w.r.t. each code, side by side along k (they share input rows).
        g_shared = torch.zeros(values.shape, device=self.device)
        codes = [(values, indices, g_shared)]
        for (_, v, idx, shared), g_v in zip(dec_terms, dec.dvalues.split(B)):
            g_v = g_v[:, : v.shape[1]]
            if shared:
                g_shared[:, : v.shape[1]] += g_v
            else:
                codes.append((v, idx, g_v))
        enc = sae_kernels.topk_encode_backward(
            torch.cat([g for _, _, g in codes], dim=1),
            torch.cat([v.float() for v, _, _ in codes], dim=1),
            torch.cat([i for _, i, _ in codes], dim=1),
            x_c,
            self.params["W_enc"],
        )
        grads["W_enc"] = enc.W_enc
        if not self.config.model.is_transcoder:
            grads["b_dec"] = grads["b_dec"] - self.split.latent_sum(enc.dx.sum(dim=0))  # x_c = x - b_dec
        return grads

    def _remove_parallel(self, grad: RowSparseGrad) -> RowSparseGrad:
        """Project out each decoder row's component along the row (the rows stay unit-norm)."""
        rows = self.params["W_dec"][grad.rows]
        along = torch.einsum("ud,ud->u", grad.grad, rows)  # row-wise dots without a [U, d] temporary
        return RowSparseGrad(grad.rows, grad.grad.addcmul_(along.unsqueeze(1), rows, value=-1.0))

    def _clip_factor(self, grads: Grads) -> torch.Tensor | None:
        """optax.clip_by_global_norm's scale for ``_backward``'s gradients summed over the batch
        (0-d): bound / norm when their global norm over every latent row exceeds
        ``train.grad_clip``, else 1; None without clipping."""
        bound = self.config.train.grad_clip
        if bound is None:
            return None
        # Squared norms of the parameters with a row per latent (summed over the processes that
        # hold the other rows), then of the rest (b_dec, W_skip; every process holds them whole).
        rows = torch.stack([grads["W_enc"].grad.pow(2).sum(), grads["W_enc"].bias_grad.pow(2).sum(),
                            grads["W_dec"].grad.pow(2).sum()]
                           + ([grads["threshold"].pow(2).sum()] if "threshold" in grads else []))
        dense = torch.stack([grads[name].pow(2).sum() for name in ("b_dec", "W_skip") if name in grads])
        norm = torch.cat([self.split.latent_sum(rows), dense]).sum().sqrt()
        return torch.where(norm > bound, bound / norm, torch.ones_like(norm))

    def _apply_gradients(self, grads: Grads, lr: float, factor: torch.Tensor | None) -> None:
        """One optimizer step on the gradients scaled by ``factor`` (0-d, from ``_clip_factor``;
        None: unscaled), then the decoder rows back to unit norm."""
        t = self.config.train
        opt = self.optimizer
        opt.begin_step()
        enc, dec = grads["W_enc"], grads["W_dec"]
        row_grads = {"W_enc": (enc.rows, enc.grad), "b_enc": (enc.rows, enc.bias_grad), "W_dec": (dec.rows, dec.grad)}
        if "threshold" in grads:  # JumpReLU: the rows in some band got a pseudo-gradient
            touched = torch.nonzero(grads["threshold"]).squeeze(1)
            row_grads["threshold"] = (touched, grads["threshold"][touched])
        dense = {name: grads[name] for name in ("b_dec", "W_skip") if name in grads}
        for name, (rows, g) in row_grads.items():
            g = g * factor if factor is not None else g
            if t.optimizer == "row_sparse_adam":
                opt.step_rows(name, rows, g, lr)
            else:
                if name not in self._dense_grads:  # reused: fresh large tensors cost page faults
                    self._dense_grads[name] = torch.empty_like(self.params[name])
                dense[name] = self._dense_grads[name].zero_().index_copy_(0, rows, g)
        if factor is not None:
            for name in ("b_dec", "W_skip"):
                if name in dense:
                    dense[name] = dense[name] * factor
        opt.step(dense, lr)
        if "threshold" in self.params:  # JumpReLU thresholds stay >= 0: active values are then positive
            self.params["threshold"].clamp_(min=0.0)
        W_dec = self.params["W_dec"]
        if t.optimizer == "row_sparse_adam":
            rows = dec.rows
            W_dec.index_copy_(0, rows, torch.nn.functional.normalize(W_dec[rows], dim=1, eps=ROW_NORM_FLOOR))
        else:
            W_dec.div_(torch.linalg.vector_norm(W_dec, dim=1, keepdim=True).clamp_min_(ROW_NORM_FLOOR))

    def _track_firing(self, fired: torch.Tensor, batch: int) -> None:
        """Firing statistics after a step of ``batch`` tokens. fired: [B', w] the local rows that
        fired (their code value > 0), EMPTY in every other slot."""
        fired = torch.where(fired >= 0, fired, self.n_rows).flatten()
        self.buffers["since_fired"].add_(batch).index_fill_(0, fired, 0)
        self.buffers["fire_count"].index_add_(0, fired, torch.ones_like(fired))

    # -- statistics and state ------------------------------------------------------------------

    def latent_stats(self, tokens: int) -> dict[str, float]:
        """Dead and dense fractions of the whole model (host sync); resets the firing counts of the window."""
        stats = latent_fractions(self.buffers["since_fired"], self.buffers["fire_count"], self.config.model, tokens,
                                 self.split.latent_sum)
        self.buffers["fire_count"].zero_()
        self.aux_active = stats["dead_fraction"] > 0
        return stats

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint needs: parameters, buffers, Adam moments (this process's rows)."""
        out = {f"param.{name}": p for name, p in self.params.items()}
        out.update({f"buffer.{name}": b for name, b in self.buffers.items()})
        out.update(self.optimizer.state_tensors())
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_count: int, aux_active: bool) -> None:
        for name, p in self.params.items():
            p.copy_(tensors[f"param.{name}"])
        for name, b in self.buffers.items():
            b.copy_(tensors[f"buffer.{name}"])
        self.optimizer.load_state_tensors(tensors, adam_count)
        self.aux_active = aux_active
