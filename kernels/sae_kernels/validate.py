"""Input checks with one clear message per mistake, naming the argument and the value."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest k the fused Triton encoder keeps in registers (its padded k, the next power of two,
# must be <= 256). Here so that checking k does not import triton.
MAX_TRITON_K = 256


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_ndim(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}, got {tuple(t.shape)}")


def _check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device: {listed}")


def check_encode_inputs(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, latent_mask: torch.Tensor | None
) -> None:
    """Validate ``topk_encode`` arguments: x [B, d], W_enc [n, d], b_enc [n], 1 <= k <= n."""
    _check_ndim("x", x, 2, "[B, d]")
    _check_ndim("W_enc", W_enc, 2, "[n, d]")
    _check_ndim("b_enc", b_enc, 1, "[n]")
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)):
        _check_float(name, t)
    if x.dtype != W_enc.dtype:
        raise TypeError(f"x ({x.dtype}) and W_enc ({W_enc.dtype}) must have the same dtype")
    n, d = W_enc.shape
    if x.shape[1] != d:
        raise ValueError(f"x has d={x.shape[1]} but W_enc has d={d} (W_enc is [n, d] = {tuple(W_enc.shape)})")
    if b_enc.shape[0] != n:
        raise ValueError(f"b_enc has {b_enc.shape[0]} entries but W_enc has n={n} latents")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= n={n}, got {k!r}")
    tensors = {"x": x, "W_enc": W_enc, "b_enc": b_enc}
    if latent_mask is not None:
        if latent_mask.shape != (n,):
            raise ValueError(f"latent_mask must have shape [n]=({n},), got {tuple(latent_mask.shape)}")
        if latent_mask.dtype != torch.bool:
            raise TypeError(f"latent_mask must be a bool tensor, got {latent_mask.dtype}")
        tensors["latent_mask"] = latent_mask
    _check_same_device(**tensors)


def check_code(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor) -> None:
    """Validate a sparse code against a decoder: values, indices [B, k]; W_dec [n, d]."""
    _check_ndim("values", values, 2, "[B, k]")
    _check_ndim("W_dec", W_dec, 2, "[n, d]")
    _check_float("values", values)
    _check_float("W_dec", W_dec)
    if indices.shape != values.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must have one shape")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
    _check_same_device(values=values, indices=indices, W_dec=W_dec)


def check_boundaries(boundaries: object, n: int) -> list[int]:
    """Validate Matryoshka prefix sizes ``m_1 < m_2 < ... < m_G = n``; returns them as ints."""
    if isinstance(boundaries, torch.Tensor):
        boundaries = boundaries.tolist()
    try:
        sizes = [int(m) for m in boundaries]  # type: ignore[union-attr]
    except TypeError as err:
        raise TypeError(f"boundaries must be a sequence of ints, got {boundaries!r}") from err
    if any(isinstance(m, bool) or int(m) != m for m in boundaries):  # type: ignore[union-attr]
        raise TypeError(f"boundaries must be integers, got {boundaries!r}")
    if not sizes:
        raise ValueError("boundaries must hold at least one prefix size (the last one = n)")
    if sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ValueError(f"boundaries must be strictly increasing positive prefix sizes, got {sizes}")
    if sizes[-1] != n:
        raise ValueError(f"the last boundary must be n={n} (the whole dictionary), got {sizes[-1]}")
    return sizes


def check_threshold_inputs(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    cap: int,
    band: float | None,
    band_cap: int | None,
) -> None:
    """Validate ``threshold_encode`` arguments: x [B, d], W_enc [n, d], b_enc [n], threshold [n],
    cap >= 1, band > 0 (or None) and band_cap >= 1 (or None)."""
    check_encode_inputs(x, W_enc, b_enc, 1, None)
    n = W_enc.shape[0]
    _check_ndim("threshold", threshold, 1, "[n]")
    _check_float("threshold", threshold)
    if threshold.shape[0] != n:
        raise ValueError(f"threshold has {threshold.shape[0]} entries but W_enc has n={n} latents")
    _check_same_device(x=x, threshold=threshold)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    if band is not None:
        if isinstance(band, bool) or not isinstance(band, (int, float)) or not band > 0 or band == float("inf"):
            raise ValueError(f"band must be a finite number > 0 (the kernel width), got {band!r}")
    if band_cap is not None:
        if band is None:
            raise ValueError("band_cap needs band (the width of the band around each threshold)")
        if isinstance(band_cap, bool) or not isinstance(band_cap, int) or band_cap < 1:
            raise ValueError(f"band_cap must be an integer >= 1, got {band_cap!r}")
