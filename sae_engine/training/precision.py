"""Compute precision: what ``precision = "auto"`` means on the hardware a run is on.

bf16 halves memory traffic and, on hardware with bf16 matrix units, runs GEMMs 2-6x faster than
fp32; without them it is emulated and about 9x slower (a Zen 3 EPYC: 12 against 104 GFLOP/s).
So "auto" is bf16 exactly where the hardware has bf16 units: CPUs with AVX-512-BF16, AMX or Arm
BF16 (from the OS's feature flags, ``sae_kernels.hardware``), CUDA GPUs of compute capability
8.0 and up. Elsewhere fp32: pre-Ampere GPUs have no bf16, and fp16 would need loss scaling.
An explicit "bf16" or "fp32" is always kept (with a warning when bf16 would be emulated).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from sae_kernels.hardware import CpuInfo, cpu_info

CHOICES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Precision:
    """A resolved compute precision and why it was chosen."""

    dtype: str  # "bf16" or "fp32"
    reason: str


def _native_bf16(device_type: str, cpu: CpuInfo | None, cuda_capability: tuple[int, int] | None) -> tuple[bool, str]:
    """(whether bf16 runs on bf16 hardware, the hardware in words)."""
    if device_type in ("cuda", "gpu"):
        if cuda_capability is None:
            import torch

            cuda_capability = torch.cuda.get_device_capability()
        major, minor = cuda_capability
        return (major, minor) >= (8, 0), f"CUDA compute capability {major}.{minor}"
    cpu = cpu or cpu_info()
    return cpu.native_bf16, cpu.describe()


def resolve_precision(requested: str, device_type: str, *, cpu: CpuInfo | None = None,
                      cuda_capability: tuple[int, int] | None = None) -> Precision:
    """The compute dtype for ``requested`` ("auto", "bf16", "fp32") on a device type ("cpu",
    "cuda"; JAX's "gpu" counts as CUDA). ``cpu`` and ``cuda_capability`` default to this
    machine's; pass them to decide for other hardware."""
    if requested not in CHOICES:
        raise ValueError(f"precision = {requested!r}: must be one of {list(CHOICES)}")
    native, hardware = _native_bf16(device_type, cpu, cuda_capability)
    if requested == "fp32":
        return Precision("fp32", f"requested; {hardware}")
    if requested == "bf16":
        if not native:
            warnings.warn(f"precision = 'bf16' on {hardware}: bf16 is emulated there and much slower "
                          "than fp32; precision = 'auto' picks fp32 on this hardware", stacklevel=2)
            return Precision("bf16", f"requested; emulated on {hardware}")
        return Precision("bf16", f"requested; {hardware}")
    if native:
        return Precision("bf16", f"auto: {hardware} has bf16 matrix units")
    return Precision("fp32", f"auto: {hardware} has no bf16 matrix units (bf16 would be emulated)")
