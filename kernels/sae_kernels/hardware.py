"""What the CPU can do for matrix products: its model name and the vector/matrix features that
decide whether bf16 is fast (native AVX-512-BF16 / AMX / Arm BF16) or emulated.

Read from the operating system's own report (``/proc/cpuinfo`` on Linux), not from a timing
probe: the flags are exact and free, while a probe is noisy on shared machines. Elsewhere
(macOS, Windows) the features are unknown and bf16 counts as emulated, the safe choice.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo flag -> the name people know it by, in the order they are listed.
_NAMED_FEATURES = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512-BF16",
    "amx_bf16": "AMX-BF16",
    "bf16": "Arm BF16",  # aarch64 "Features" line (FEAT_BF16)
}


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and its feature flags (lower case, as the kernel reports them)."""

    model: str
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """True when bf16 matrix products run on bf16 hardware rather than being emulated."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16", "bf16"})

    @property
    def features(self) -> list[str]:
        """The features that matter for GEMMs, by their usual names (e.g. ["AVX2", "AVX-512"])."""
        return [name for flag, name in _NAMED_FEATURES.items() if flag in self.flags]

    def describe(self) -> str:
        """One line for benchmark outputs, e.g. ``AMD EPYC (AVX2, AVX-512, AVX-512-BF16)``."""
        return f"{self.model} ({', '.join(self.features) or 'no AVX2'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """A CpuInfo from the text of ``/proc/cpuinfo`` (x86 ``flags`` or aarch64 ``Features``)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", frozenset(flags))


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU (read once per process)."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        return parse_cpuinfo(path.read_text(errors="replace"))
    return CpuInfo(platform.processor() or platform.machine() or "unknown CPU", frozenset())
