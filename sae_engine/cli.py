"""The ``sae-engine`` command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite and print its results."""
    if args.suite == "train-step":
        from . import bench_train

        return bench_train.main(args.rest)
    if not (REPO_ROOT / "bench" / "table.py").exists():
        print(f"sae-engine: benchmarks live in the source tree (bench/ beside {REPO_ROOT / 'sae_engine'});"
              " install from a checkout with `pip install -e .`", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    from bench import table

    return table.main([args.suite, *args.rest])


def _train(args: argparse.Namespace) -> int:
    """Train (or resume) an SAE or transcoder from a TOML config."""
    from .config import ConfigError, load_config
    from .trainer import TrainingError, train

    try:
        config = load_config(args.config, args.set)
        result = train(config)
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, FileNotFoundError)) else 1
    state = "interrupted; resume with the same command" if result.interrupted else "done"
    summary = ", ".join(f"{key}={value:.4g}" for key, value in result.final.items() if key in ("fvu", "eval_fvu", "l0", "dead_fraction"))
    print(f"{state}: step {result.step}, {result.tokens} tokens, {summary}; run folder {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-engine", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train or resume an SAE / transcoder")
    train.add_argument("--config", help="TOML run config (see examples/); defaults when absent")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    train.set_defaults(run=_train)
    bench = commands.add_parser("bench", help="throughput and memory benchmarks against baselines")
    bench.add_argument("suite", choices=["kernels", "train-step"], help="what to measure")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (see --help of bench.table)")
    bench.set_defaults(run=_bench)
    from .esm import extract as esm_extract, prepare as esm_prepare

    from .esm import splice as esm_splice

    esm_prepare.register(commands)
    esm_extract.register(commands)
    esm_splice.register(commands)
    from .interop.commands import register as register_interop

    register_interop(commands)
    try:
        from .go.enrich import register as register_enrich
    except ImportError:  # scipy and obonet come with the `analysis` extra
        pass
    else:
        register_enrich(commands)
        from .demo import register as register_demo
        from .features import register as register_features

        register_features(commands)
        register_demo(commands)
        from .describe import register as register_describe

        register_describe(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
