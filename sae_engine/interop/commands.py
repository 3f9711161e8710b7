"""``sae-engine export`` and ``sae-engine import``."""
from __future__ import annotations

import argparse
import sys

EXPORT_FORMATS = ["native", "saelens", "sparsify", "dictionary_learning"]


def _export(args: argparse.Namespace) -> int:
    from ..checkpoints.export import ExportError, export_native

    try:
        if args.format == "native":
            out = export_native(args.run_dir, args.out)
        else:
            from . import export_run

            out = export_run(args.run_dir, args.format, args.out)
    except (ExportError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} ({args.format}) -> {out}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from . import import_model
    from .portable import InteropError

    try:
        out = import_model(args.path, args.format, args.out, k=args.k, row_cap=args.row_cap)
    except (InteropError, FileNotFoundError, ValueError) as error:
        print(f"sae-engine import: error: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.path} ({args.format}) -> run folder {out}; continue training with "
          f"`sae-engine train --config {out / 'train.toml'}` plus data settings (fresh optimizer state)")
    return 0


def register(commands) -> None:
    """Add ``sae-engine export`` and ``sae-engine import``."""
    export = commands.add_parser("export", help="write a run's latest checkpoint as one file or in a peer's format")
    export.add_argument("run_dir", help="training run folder")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="native",
                        help="native: one model.safetensors-format file; saelens / sparsify / dictionary_learning: "
                             "a folder that library loads (default native)")
    export.add_argument("--out", required=True, help="new file (native) or new folder (peer formats)")
    export.set_defaults(run=_export)
    imp = commands.add_parser("import", help="turn a SAELens / sparsify / dictionary_learning SAE into a run folder")
    imp.add_argument("path", help="the peer's folder (or a dictionary_learning / InterPLM ae.pt file)")
    imp.add_argument("--format", choices=EXPORT_FORMATS[1:], required=True)
    imp.add_argument("--out", required=True, help="new run folder")
    imp.add_argument("--k", type=int, help="threshold encoders (ReLU, one-threshold JumpReLU) carry no k: the "
                                            "BatchTopK k for further training")
    imp.add_argument("--row-cap", type=int, help="threshold encoders: latents kept per vector at most (default 4k; "
                                                  "JumpReLU with per-latent thresholds: its lowest-index active "
                                                  "latents, the rest counted as overflow)")
    imp.set_defaults(run=_import)
