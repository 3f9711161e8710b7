"""The names of checkpoint tensors, and which of them are split by latent.

A backend's ``state_tensors`` (see ``sae_engine.training.backend.state_shapes``) are named
``param.<name>``, ``adam.m.<name>``, ``adam.v.<name>`` and ``buffer.<name>``; the trainer adds the
ring buffer's ``buffer.unserved``, ``buffer.unserved_positions`` and ``buffer.rng``. These names
are the checkpoint format: every layout and every backend reads them from here.
"""
from __future__ import annotations

ROW_PARAMS = ("W_enc", "b_enc", "W_dec")  # parameters with one row per latent
STATISTICS = ("buffer.since_fired", "buffer.fire_count")  # [n + 1]: slot n absorbs empty code slots
MODEL_KEY_PREFIXES = ("param.", "buffer.in_scale", "buffer.out_scale", "buffer.batchtopk_threshold")  # model.safetensors
RING_TENSORS = ("unserved", "unserved_positions", "rng")  # the ring buffer's state kept as tensors
RING_KEYS = tuple(f"buffer.{name}" for name in RING_TENSORS)  # ... and their checkpoint names


def is_row_param(key: str) -> bool:
    """A per-latent parameter or one of its Adam moments: ``[n, ...]``, one row per latent."""
    kind, _, name = key.rpartition(".")
    return name in ROW_PARAMS and kind in ("param", "adam.m", "adam.v")


def has_latent_rows(key: str) -> bool:
    """A tensor that a latent-sharded run splits by rows: the row parameters, their moments and
    the firing statistics (whose absorbing slot n each rank keeps for itself)."""
    return is_row_param(key) or key in STATISTICS


def is_model_key(key: str) -> bool:
    """Whether a tensor belongs in the model file (what analysis and export need)."""
    return key.startswith(MODEL_KEY_PREFIXES)
