"""Ahead-of-time compilation of every Triton kernel for the H100 (sm_90a) and A100 (sm_80).

No GPU needed: Triton lowers each kernel at the block sizes the launchers use
(``AOT_SPECS``) to a cubin, and the ``cuobjdump`` shipped in the Triton wheel
reads its registers, stack/local memory and machine code. This catches what the
interpreter cannot: kernels that do not build, that spill registers to local
memory, or whose GEMM lost the tensor-core path. Run with ``pytest -s`` to see
the resource table.

Compilation runs in a subprocess (``python -m sae_kernels.aot --json``),
which keeps the compiler's memory out of the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from sae_kernels import aot

ARCHS = ("sm_90a", "sm_80")
CUOBJDUMP = aot.nvidia_tool("cuobjdump")

pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton wheel without the NVIDIA backend tools")


@pytest.fixture(scope="module")
def resource_rows() -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "sae_kernels.aot", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    print("\n" + aot.format_resource_table(rows))
    return rows


def test_every_kernel_compiles_for_each_arch(resource_rows: list[dict[str, Any]]) -> None:
    built = {(r["kernel"], r["dtype"], r["arch"]) for r in resource_rows}
    wanted = {(spec.label, dtype, arch) for dtype, spec in aot.AOT_SPECS for arch in ARCHS}
    assert built == wanted
    assert {spec.kernel.__name__ for _, spec in aot.AOT_SPECS} == {
        "_encode_topk_kernel", "_decode_kernel", "_gather_dot_kernel", "_segment_rows_kernel",
        "_prefix_decode_kernel", "_threshold_encode_kernel"}


def test_no_spills_and_sane_registers(resource_rows: list[dict[str, Any]]) -> None:
    for r in resource_rows:
        where = f"{r['kernel']} {r['dtype']} {r['arch']}"
        assert r["local"] == 0 and r["stack"] == 0, f"{where} uses local memory (register spills): {r}"
        assert 0 < r["regs"] <= 255, f"{where}: {r['regs']} registers"
        assert r["shared"] <= 227 * 1024, f"{where}: {r['shared']} B of shared memory"


def test_encoder_gemm_runs_on_tensor_cores(resource_rows: list[dict[str, Any]]) -> None:
    for r in resource_rows:
        if not r["kernel"].startswith(("encode_topk", "threshold_encode")):
            continue
        where = f"{r['kernel']} {r['dtype']} {r['arch']}"
        assert r["hgmma"] or r["hmma"], f"{where}: no tensor-core instructions in SASS"
        if r["arch"] == "sm_80":
            assert not r["hgmma"], where
    # At the benchmark shape the H100 build must use Hopper's warpgroup MMA.
    for r in resource_rows:
        if r["kernel"] in ("encode_topk k=32", "threshold_encode band=no", "threshold_encode band=yes") \
                and r["arch"] == "sm_90a":
            assert r["hgmma"], f"{r['dtype']} {r['kernel']} on sm_90a fell back from HGMMA"
