"""Ahead-of-time compilation of every Triton kernel for a GPU target, on any machine.

Triton lowers a kernel to a cubin for a named target (``sm_90a`` for the H100, ``sm_80`` for
the A100) without a GPU, given its argument types and compile-time values. ``AOT_SPECS``
lists every kernel of :mod:`sae_kernels.triton_kernels` at the block sizes its launcher picks
for the benchmark shapes; :func:`resource_usage` reads a compiled kernel's registers,
stack/local memory (spills), shared memory and whether its SASS uses tensor-core
instructions, with the ``cuobjdump`` shipped in the Triton wheel. This catches what the
interpreter cannot: kernels that do not build, spill, or lost the tensor-core GEMM.

``python -m sae_kernels.aot [--json]`` prints the table for sm_90a and sm_80.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton

from . import triton_kernels as tk

_TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at the block sizes a launcher uses, for ahead-of-time compilation.

    ``signature`` maps every argument to a Triton type string (``"*bf16"``,
    ``"i32"``, ``"constexpr"``); ``constexprs`` gives the compile-time values;
    ``divisible`` names the arguments the runtime would specialise as multiples
    of 16 (aligned pointers, ``d = 1280``).
    """

    label: str
    kernel: tk.Kernel
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int = 3
    divisible: tuple[str, ...] = field(default_factory=tuple)


def _encode_spec(dtype: torch.dtype, k: int) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    # B=4096, n=131072 on an H100's 132 SMs: the plan the launcher makes at the benchmark shape.
    plan = tk.encode_plan(4096, 131072, k, dtype, num_sms=132)
    return KernelSpec(
        label=f"encode_topk k={k}",
        kernel=tk._encode_topk_kernel,
        signature={"X": f"*{t}", "W": f"*{t}", "Bias": "*fp32", "Cand": "*i64",
                   "B": "i32", "n": "i32", "d": "i32", "k": "i32", "tiles_per_split": "i32",
                   **{name: "constexpr" for name in plan.constexprs}},
        constexprs=plan.constexprs,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        divisible=("X", "W", "Bias", "Cand", "B", "n", "d", "k"),
    )


def _decode_spec(dtype: torch.dtype) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    return KernelSpec(
        label="decode",
        kernel=tk._decode_kernel,
        signature={"V": f"*{t}", "I": "*i64", "W": f"*{t}", "Out": f"*{t}", "k": "i32", "d": "i32",
                   "BLOCK_J": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_J": tk._DECODE_BLOCK_J, "BLOCK_D": tk._DECODE_BLOCK_D},
        num_warps=tk._DECODE_WARPS, divisible=("V", "I", "W", "Out", "k", "d"),
    )


def _gather_spec(dtype: torch.dtype) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    return KernelSpec(
        label="gather_dot",
        kernel=tk._gather_dot_kernel,
        signature={"G": f"*{t}", "I": "*i64", "W": f"*{t}", "Out": "*fp32", "k": "i32", "d": "i32",
                   "BLOCK_J": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_J": tk._GATHER_BLOCK_J, "BLOCK_D": tk._GATHER_BLOCK_D},
        num_warps=tk._GATHER_WARPS, divisible=("G", "I", "W", "Out", "k", "d"),
    )


def _segment_spec(dtype: torch.dtype) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    return KernelSpec(
        label="segment_rows",
        kernel=tk._segment_rows_kernel,
        signature={"Coeff": "*fp32", "Order": "*i64", "Starts": "*i64", "Ends": "*i64",
                   "Src": f"*{t}", "Out": "*fp32", "Sums": "*fp32", "k": "i32", "d": "i32",
                   "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_P": tk._SEGMENT_BLOCK_P, "BLOCK_D": tk._SEGMENT_BLOCK_D},
        num_warps=tk._SEGMENT_WARPS,
        divisible=("Coeff", "Order", "Starts", "Ends", "Src", "Out", "Sums", "k", "d"),
    )


def _prefix_decode_spec(dtype: torch.dtype) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    return KernelSpec(
        label="prefix_decode",
        kernel=tk._prefix_decode_kernel,
        signature={"V": f"*{t}", "I": "*i64", "Ends": "*i64", "W": f"*{t}", "Out": f"*{t}",
                   "B": "i32", "k": "i32", "d": "i32", "G": "i32",
                   "BLOCK_J": "constexpr", "BLOCK_D": "constexpr"},
        constexprs={"BLOCK_J": tk._PREFIX_BLOCK_J, "BLOCK_D": tk._PREFIX_BLOCK_D},
        num_warps=tk._PREFIX_WARPS, divisible=("V", "I", "Ends", "W", "Out", "B", "k", "d"),
    )


def _threshold_spec(dtype: torch.dtype, has_band: bool) -> KernelSpec:
    t = _TORCH_TO_TRITON[dtype]
    # B=8192, n=131072 on an H100's 132 SMs: the launcher's plan at the benchmark shape.
    plan = tk.threshold_plan(8192, 131072, dtype, num_sms=132, has_band=has_band)
    return KernelSpec(
        label=f"threshold_encode band={'yes' if has_band else 'no'}",
        kernel=tk._threshold_encode_kernel,
        signature={"X": f"*{t}", "W": f"*{t}", "Bias": "*fp32", "Thr": "*fp32",
                   "Vals": "*fp32", "Idx": "*i32", "Cnt": "*i32",
                   "BandPre": "*fp32", "BandIdx": "*i32", "BandCnt": "*i32",
                   "B": "i32", "n": "i32", "d": "i32", "cap": "i32", "band_cap": "i32",
                   "half_band": "fp32", "tiles_per_split": "i32",
                   **{name: "constexpr" for name in plan.constexprs}},
        constexprs=plan.constexprs,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
        divisible=("X", "W", "Bias", "Thr", "Vals", "Idx", "Cnt", "BandPre", "BandIdx", "BandCnt",
                   "B", "n", "d", "cap", "band_cap"),
    )


# Benchmark shapes: B=4096, d=1280, n=131072, k=32, bf16 and fp32. The larger-k
# encoder entries cover the other register layouts up to MAX_K_PAD.
AOT_SPECS: list[tuple[str, KernelSpec]] = [
    (dtype_name, spec)
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))
    for spec in (
        _encode_spec(dtype, 32),
        _decode_spec(dtype),
        _gather_spec(dtype),
        _segment_spec(dtype),
        _prefix_decode_spec(dtype),
        _threshold_spec(dtype, has_band=False),
        _threshold_spec(dtype, has_band=True),
    )
] + [(name, _encode_spec(dtype, k)) for k in (128, 256)
     for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))]


def compile_spec(spec: KernelSpec, arch: int) -> Any:
    """Compile ``spec`` for ``sm_<arch>`` (90 builds sm_90a) without a GPU."""
    from triton.backends.compiler import GPUTarget

    kernel = spec.kernel.compiled
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    src = triton.compiler.ASTSource(fn=kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def nvidia_tool(name: str) -> Path:
    """Path of a CUDA binary shipped in the Triton wheel (e.g. ``cuobjdump``); may not exist."""
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def resource_usage(compiled: Any) -> dict[str, Any]:
    """Registers, shared memory, local memory and tensor-core use of a compiled kernel.

    Reads the cubin with the ``cuobjdump`` shipped in the Triton wheel.
    """
    cuobjdump = str(nvidia_tool("cuobjdump"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)],
                               check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "--dump-sass", str(path)],
                              check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "regs": int(fields["REG"]),
        "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        # Triton allocates its shared memory dynamically; the cubin's static count is 0.
        "shared": int(compiled.metadata.shared),
        "hgmma": bool(re.search(r"\bHGMMA\b", sass)),
        "hmma": bool(re.search(r"\bHMMA\b", sass)),
    }


def resource_table(archs: tuple[int, ...] = (90, 80)) -> list[dict[str, Any]]:
    """Compile every ``AOT_SPECS`` entry for each arch and collect :func:`resource_usage`."""
    table = []
    for dtype_name, spec in AOT_SPECS:
        for arch in archs:
            row = {"kernel": spec.label, "arch": f"sm_{arch}{'a' if arch == 90 else ''}", "dtype": dtype_name,
                   "num_warps": spec.num_warps}
            row.update(resource_usage(compile_spec(spec, arch)))
            table.append(row)
    return table


def format_resource_table(table: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`resource_table` rows."""
    lines = ["| kernel | arch | dtype | warps | regs | shared (B) | local/stack (B) | HGMMA | HMMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['num_warps']} | {r['regs']} | "
                     f"{r['shared']} | {r['local']}/{r['stack']} | {'yes' if r['hgmma'] else 'no'} | "
                     f"{'yes' if r['hmma'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Print the resource table: markdown, or one JSON line with ``--json``."""
    rows = resource_table()
    print(json.dumps(rows) if "--json" in argv else format_resource_table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
