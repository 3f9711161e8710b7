"""Benchmark table: ``python -m bench.table kernels [--device cpu|cuda] [--shape small|target] [--json]``.

Prints, for every case, the median time, the ratio to the group's baseline (encoder: the bare
GEMM; decoder: ``F.embedding_bag``; backward: dense PyTorch), the speedup over plain PyTorch,
peak memory, and for the decoder the bandwidth against a copy measured in the same run;
then PASS/FAIL lines for the acceptance targets.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import kernels_bench as kb


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.0f}"


def format_rows(rows: list[kb.Row]) -> str:
    """A fixed-width text table, one block per shape."""
    header = (
        f"{'group':<9} {'case':<14} {'time ms':>10} {'ratio':>7} {'vs torch':>8} "
        f"{'peak+ MiB':>10} {'RSS MiB':>8} {'GB/s':>7} {'of copy':>7}  note"
    )
    lines = []
    for shape in dict.fromkeys(row.shape for row in rows):
        lines += ["", f"== {shape}", header]
        for r in (r for r in rows if r.shape == shape):
            lines.append(
                f"{r.group:<9} {r.case:<14} {_fmt(r.time_s and r.time_s * 1e3, '10.1f'):>10} "
                f"{_fmt(r.ratio, '7.2f'):>7} {_fmt(r.speedup_vs_torch, '8.2f'):>8} "
                f"{_mib(r.peak_growth_bytes):>10} {_mib(r.peak_rss_bytes):>8} "
                f"{_fmt(r.gbps, '7.1f'):>7} {_fmt(r.bandwidth_fraction, '7.0%'):>7}  {r.note}"
            )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.table", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["kernels"])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    parser.add_argument("--shape", choices=["small", "target"], default="small")
    parser.add_argument("--groups", nargs="+", choices=kb.GROUPS, default=list(kb.GROUPS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median kept)")
    parser.add_argument("--json", action="store_true", help="print machine info and rows as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    rows, info = kb.run_all(args.device, args.shape, groups=tuple(args.groups), repeats=args.repeats)
    targets = kb.check_targets(rows, args.device)
    if args.json:
        print(json.dumps({"machine": info, "rows": kb.rows_as_dicts(rows), "targets": targets}, indent=2))
        return 0
    print(", ".join(f"{key}: {value}" for key, value in info.items()))
    print(
        "ratio = time / baseline (encoder: bare GEMM into a preallocated output; decoder: "
        "embedding_bag; backward: dense torch); vs torch = torch time / time; peak+ = peak "
        "memory above the level before the call"
    )
    print(format_rows(rows))
    if targets:
        print("\n" + "\n".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
