"""The ``sae-engine`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite from the source tree's bench/ folder and print its table."""
    if not (REPO_ROOT / "bench" / "table.py").exists():
        print(f"sae-engine: benchmarks live in the source tree (bench/ beside {REPO_ROOT / 'sae_engine'});"
              " install from a checkout with `pip install -e .`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    from bench import table

    return table.main([args.suite, *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="throughput and memory benchmarks against baselines")
    bench.add_argument("suite", choices=["kernels"], help="what to measure")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see --help of bench.table)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
