"""The ``sae-engine`` command line."""
from __future__ import annotations

import argparse
import sys


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite and print its results."""
    from .benchmarks import main as bench_main

    return bench_main([args.suite, *args.rest])


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
    bench.add_argument("suite", choices=["kernels", "train-step", "esm", "enrich"], help="what to measure")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (sae-engine bench SUITE --help)")
    bench.set_defaults(run=_bench)
    from .esm import extract as esm_extract, prepare as esm_prepare

    from .esm import splice as esm_splice

    esm_prepare.register(commands)
    esm_extract.register(commands)
    esm_splice.register(commands)
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
