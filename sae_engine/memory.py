"""Process-wide memory settings for CPU work on large tensors."""
from __future__ import annotations

import ctypes
import ctypes.util
import sys


def tune_allocator() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the kernel.

    By default glibc serves large blocks with ``mmap`` and unmaps them when freed, and trims the
    heap top: every batch then page-faults its large tensors in again (about 40% of fair-esm's
    loop time on a 2-core CPU). With mmap off for malloc and trimming only above 1 GiB, freed
    blocks are reused. Process-wide, so only a program's entry point should call it: the
    ``sae-engine`` command line does; library functions never do. Returns False where there is
    no glibc (then a no-op).
    """
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
    ok = libc.mallopt(m_mmap_max, 0)
    ok &= libc.mallopt(m_trim_threshold, 1 << 30)
    ok &= libc.mallopt(m_top_pad, 64 << 20)  # grow the heap in large steps
    return bool(ok)
