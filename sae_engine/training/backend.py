"""The contract every training backend keeps (``TorchSAE``, ``JaxSAE``) and the rules they share.

The trainer and the placements (``sae_engine.parallel.apply``) speak to a backend only through
``SAEBackend`` (a JAX mesh's checkpoints also through ``ArrayBackend``); analysis reads a trained
model through ``SAEAnalysis``. Shapes: raw input activations x [B, d_in]; targets y [B, d_out]
(y is x for an SAE; another layer for a transcoder); a sparse code is (values [B, w] fp32,
indices [B, w] int64, ``sae_kernels.EMPTY`` = -1 in empty slots). Tensors cross the contract as
torch tensors on the CPU or the backend's device; metrics may be torch or JAX 0-d scalars
(``float()`` reads them).

The model (both backends): z = TopK(W_enc x_c + b_enc), prediction = W_dec^T z + b_dec
(+ W_skip xn), with xn the normalised input and x_c = xn - b_dec for SAEs, xn for transcoders.
The constants both backends use are named below (``MULTI_TOPK_WIDTH`` and the rest). Code widths:
- TopK: the code holds the k largest pre-activations per row. With Multi-TopK (Gao et al. 2024)
  training also selects 4k per row for the auxiliary loss at 4k, but the model's code (the main
  loss, ``encode``, ``evaluate``, the firing statistics) is always the top k.
- BatchTopK (Bussmann et al. 2024): training keeps the B*k largest pre-activations of the batch
  among each row's ``row_cap`` best; inference keeps a row's candidates above the threshold
  learned in training. Both give codes of width ``row_cap`` whose unkept slots are EMPTY.
  Multi-TopK is defined for a fixed per-row k and BatchTopK has none (its L0 is set by the
  threshold at inference), so ``RunConfig.validate`` rejects the combination.
- JumpReLU (Rajamanoharan et al. 2024): latent i is active where its pre-activation exceeds
  its learned threshold theta_i (>= 0), with the pre-activation as value
  (``sae_kernels.threshold_encode``); the code holds a row's active latents in index order up
  to ``row_cap`` (``model.jumprelu_row_cap``; rows with more keep their lowest-index ones and
  count in the ``overflow`` metric). Loss: FVU + ``l0_coef`` * (mean active latents per vector)
  (+ AuxK); theta gets the rectangle-kernel pseudo-gradient of bandwidth
  ``jumprelu_bandwidth`` from both terms (``sae_kernels.threshold_encode``'s docstring), the
  encoder the straight-through gradient of the active values and none from the L0 term
  (the paper's recipe; SAELens' default). Split over latent rows, each process's code holds
  its own active latents (no all-gather) and the cap applies per process.
- Matryoshka TopK / BatchTopK (Bussmann et al. 2025; Nabeshima 2024): the code of TopK /
  BatchTopK; the loss is the mean over the prefixes m_1 < ... < m_G = n (``model.prefixes``)
  of each prefix's FVU, the prefix's prediction being the decode of the code's latents below
  m_g plus b_dec (and the skip connection): ``matryoshka_loss_weights``. dictionary_learning's
  MatryoshkaBatchTopKTrainer weights its prefixes equally by default; SAELens sums them
  unweighted (a factor G on the reconstruction terms against AuxK). The reported ``fvu`` is the
  whole dictionary's (the last prefix); AuxK reconstructs its residual, as for the other kinds.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from ..config import ModelConfig, RunConfig, TrainConfig
from .precision import Precision, resolve_precision

METRICS = ("loss", "fvu", "aux_loss", "l0", "overflow")  # what train_step returns
EVAL_METRICS = ("eval_fvu", "eval_l0")  # what evaluate returns
LATENT_STATS = ("dead_fraction", "dense_fraction")  # what latent_stats returns

# The model's constants (Gao et al. 2024 for Multi-TopK and AuxK, Bussmann et al. 2024 for BatchTopK).
MULTI_TOPK_WIDTH = 4  # Multi-TopK's auxiliary code holds this many times k latents per row ...
MULTI_TOPK_WEIGHT = 1 / 8  # ... and its reconstruction loss enters the total with this weight
BATCHTOPK_THRESHOLD_RATE = 0.01  # step of the inference threshold's running mean towards a batch's cutoff
DENSE_FREQUENCY = 0.1  # a latent firing on more than this fraction of a window's tokens is dense
AUX_VARIANCE_FLOOR = 1e-12  # AuxK divides by the residual's variance, at least this
LAYER_NORM_EPS = 1e-5  # added to the variance in the per-vector normalisation (model.normalize = "layernorm")
ROW_NORM_FLOOR = 1e-12  # decoder rows are divided by their norm, at least this, back to unit norm
# JumpReLU (Rajamanoharan et al. 2024): the thresholds' initial value (the paper's, on inputs of
# unit mean squared norm; dictionary_learning's too). The threshold is the parameter itself, kept
# >= 0 after each step, as SAELens trains it (the paper trains its logarithm).
JUMPRELU_INIT_THRESHOLD = 0.001


def selection_width(m: ModelConfig) -> int:
    """Candidates per row the encoder selects in a training step: k, 4k with Multi-TopK,
    row_cap for BatchTopK and JumpReLU (at most n_latents)."""
    if m.batch_selection or m.kind == "jumprelu":
        return m.row_cap
    return min(MULTI_TOPK_WIDTH * m.k if m.multi_topk else m.k, m.n_latents)


def code_width(m: ModelConfig) -> int:
    """Width w of the model's code (``encode``, ``evaluate``, the main loss): k for TopK,
    row_cap for BatchTopK and JumpReLU (slots not kept are EMPTY)."""
    return m.row_cap if m.batch_selection or m.kind == "jumprelu" else m.k


def matryoshka_loss_weights(m: ModelConfig) -> list[float]:
    """The weight of each prefix's FVU in the loss: equal, summing to 1 (one prefix: 1.0, BatchTopK's loss)."""
    G = len(m.prefixes)
    return [1.0 / G] * G


def local_prefixes(prefixes: list[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """The Matryoshka prefixes m_1 < ... < m_G = n as a holder of the latent rows [lo, hi) sees them.

    Its rows contribute to every prefix g with m_g > lo, the first min(m_g, hi) - lo of them.
    -> (local sizes: the distinct values of those counts, strictly increasing and ending at
    hi - lo, the boundaries of its own ``prefix_decode``; group_map [G]: for each prefix g the
    local prefix whose partial reconstruction is this holder's part of it, -1 where m_g <= lo)."""
    counts = [min(m, hi) - lo if m > lo else 0 for m in prefixes]
    local = sorted({c for c in counts if c > 0})
    return local, [local.index(c) if c > 0 else -1 for c in counts]


def state_shapes(m: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor in ``state_tensors`` (checkpoint names)."""
    n, d_in, d_out = m.n_latents, m.d_in, m.target_dim
    params = {"W_enc": (n, d_in), "b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
    if m.skip_connection:
        params["W_skip"] = (d_out, d_in)
    if m.kind == "jumprelu":
        params["threshold"] = (n,)
    out = {f"param.{name}": (shape, torch.float32) for name, shape in params.items()}
    out.update({f"adam.{moment}.{name}": (shape, torch.float32) for moment in "mv" for name, shape in params.items()})
    out.update({
        "buffer.since_fired": ((n + 1,), torch.int64),  # tokens since each latent fired; slot n: empty slots
        "buffer.fire_count": ((n + 1,), torch.int64),  # firings in the current statistics window
        "buffer.in_scale": ((), torch.float32),
        "buffer.out_scale": ((), torch.float32),
        "buffer.batchtopk_threshold": ((), torch.float32),
    })
    return out


def run_precision(train: TrainConfig, device_type: str, recorded: str | None = None) -> Precision:
    """A run's compute precision: ``recorded`` (the dtype its checkpoint says it started with,
    kept on resume, with ``sae_engine.training.precision``'s warning where this hardware emulates bf16),
    else ``train.precision`` decided for this device. Master weights, gradients and optimizer
    state are fp32 either way."""
    if recorded is None:
        return resolve_precision(train.precision, device_type)
    if train.precision not in ("auto", recorded):
        warnings.warn(f"train.precision = {train.precision!r} is not applied: this run started in {recorded} "
                      f"and resumes in it (a new train.out_dir starts a run in {train.precision})", stacklevel=2)
    here = resolve_precision(recorded, device_type)
    return Precision(recorded, f"recorded when the run started; here: {here.reason.removeprefix('requested; ')}")


def latent_fractions(since_fired: torch.Tensor, fire_count: torch.Tensor, m: ModelConfig, tokens: int,
                     latent_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """``LATENT_STATS`` of the whole model from the firing statistics of some of its latent rows
    (host sync). since_fired, fire_count: [r + 1] for r rows, slot r the absorbing one (left out);
    tokens: those of the window ``fire_count`` counts; latent_sum: sums the two counts [2] over
    the processes holding the other latents (None: these rows are all ``m.n_latents``)."""
    rows = since_fired.shape[0] - 1
    dead = (since_fired[:rows] > m.dead_tokens).sum()
    dense = (fire_count[:rows].float() / max(tokens, 1) > DENSE_FREQUENCY).sum()
    counts = torch.stack([dead, dense]).float()
    if latent_sum is not None:
        counts = latent_sum(counts)
    return dict(zip(LATENT_STATS, (counts / m.n_latents).tolist()))


@runtime_checkable
class SAEBackend(Protocol):
    """A TopK / BatchTopK SAE or transcoder with its optimizer state, as the trainer and the
    placements (``sae_engine.parallel.apply``) use it: on one device, or one process's part of
    a model split over a mesh (its tensors then those of its latent rows).

    ``aux_active``: whether AuxK runs (set by ``latent_stats`` once a latent is dead, restored
    from checkpoints).
    """

    aux_active: bool

    @property
    def adam_count(self) -> int:
        """Completed optimizer steps (Adam's bias correction count)."""
        ...

    def initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent initialisation from a sample x [N, d_in], y [N, d_out]: the
        normalisation scales (``model.normalize = "dataset"``) and b_dec."""
        ...

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> dict[str, Any]:
        """Forward, sparse backward and one Adam step on a batch x [B, d_in], y [B, d_out].
        -> ``METRICS`` as 0-d scalars, not yet synchronised (the caller decides when)."""
        ...

    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """``EVAL_METRICS`` on held-out x [B, d_in], y [B, d_out] with the inference code:
        FVU of the prediction in the normalised target space, mean L0."""
        ...

    def latent_stats(self, tokens: int) -> dict[str, float]:
        """``LATENT_STATS`` (host sync; ``latent_fractions``): the fraction of latents that have
        not fired for more than ``model.dead_tokens`` tokens, and of those that fired on more than
        ``DENSE_FREQUENCY`` of the ``tokens`` since the last call; resets the window's firing
        counts, sets ``aux_active``."""
        ...

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a checkpoint needs, named and typed as ``state_shapes(config.model)``;
        the same names, shapes and dtypes in every backend. They may be views of the live state
        (no copy at large n): read or copy them before the next call that changes it."""
        ...

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], adam_count: int, aux_active: bool) -> None:
        """Restore ``state_tensors`` of any backend, with the step count and ``aux_active``."""
        ...


@runtime_checkable
class ArrayBackend(SAEBackend, Protocol):
    """A backend whose state lives in JAX arrays placed by a layout (``JaxSAE``): what a JAX
    mesh's orbax checkpoints write and restore."""

    layout: Any  # ``jax_backend.Layout``: where the arrays live

    def state_arrays(self) -> dict[str, Any]:
        """The state as JAX arrays under checkpoint names, as placed (per-latent ones with the
        layout's rows)."""
        ...

    def load_state_arrays(self, arrays: dict[str, Any], adam_count: int, aux_active: bool) -> None:
        """Restore from ``state_arrays``' names and shapes."""
        ...


@runtime_checkable
class SAEAnalysis(Protocol):
    """What analysis reads of a trained model: the code, the prediction, the reconstruction."""

    config: RunConfig

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inference code of raw x [B, d_in]. -> values [B, w] fp32, indices [B, w] int64,
        with w = ``code_width(config.model)``."""
        ...

    def decode(self, values: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The prediction from a code values/indices [B, w] of raw input x [B, d_in] (read by
        layer norm and the skip connection), in the target's raw scale. -> [B, d_out] fp32.
        A transcoder with ``normalize = "layernorm"`` has no target scale to return to: ValueError."""
        ...

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """An SAE's reconstruction of raw x [B, d_in]: ``decode(*encode(x), x)``. -> [B, d_in] fp32.
        Transcoders: ValueError (they predict another layer; use ``decode``)."""
        ...
