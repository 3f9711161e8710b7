"""ESM2 extraction throughput: ``sae-engine bench esm [--proteins 100] [--layers 3,6] [--json]``.

fair-esm's own loop against ``sae_engine.esm.extract`` on the same proteins, on the CPU every
contender in a fresh process (allocator state and caches do not leak from one to the next):

- ``fair-esm`` and ``fair-esm-bf16``: the loop of fair-esm's ``scripts/extract.py``
  (``FastaBatchedDataset``, length-sorted batches of 4096 tokens, ``model(tokens,
  repr_layers=...)`` under ``no_grad``, per-protein clones), in fp32 and under bf16 autocast:
  the baseline is the faster of the two on this machine;
- ``fair-esm+malloc``: the fp32 loop after :func:`~sae_engine.memory.tune_allocator`;
- ``ours-fp32`` (without and with the allocator setting) and ``ours-bf16``: :class:`FastESM2`
  with the same batching budget, residue rows gathered per batch. The summary says which of
  the two ``precision = "auto"`` picks here and how it compares with the faster.

Proteins: a random sample of the prepared human proteome (``sae-engine data prepare``) or of
``--fasta``, cropped to 1022 residues; ``--random-sequences`` draws proteins of human-like
lengths instead. Model: the prepared default weights, any spec ``load_esm2`` accepts, or
``random:LAYERS,DIM,HEADS`` (fair-esm's ESM2 with random weights: throughput does not depend
on the weights). Accuracy against fair-esm's fp32 output is checked in this process on a subset.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import random
import sys
import time
from typing import Any

import torch

from .harness import machine_info, machine_line, print_json, run_once

CONTENDERS = ("fair-esm", "fair-esm-bf16", "fair-esm+malloc", "ours-fp32-nomalloc", "ours-fp32", "ours-bf16")
BASELINES = ("fair-esm", "fair-esm-bf16")  # the peer in each of its settings
TOKENS_PER_BATCH = 4096
MAX_RESIDUES = 1022
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def sample_sequences(count: int, seed: int = 0, fasta: str | None = None, synthetic: bool = False) -> list[str]:
    """``count`` proteins cropped to 1022 residues: a random sample of ``fasta`` (default: the
    prepared human proteome), or with ``synthetic`` random residues at log-normal lengths
    (median 350, as human proteins)."""
    rng = random.Random(seed)
    if synthetic:
        lengths = [min(MAX_RESIDUES, max(30, int(rng.lognormvariate(5.86, 0.6)))) for _ in range(count)]
        return ["".join(rng.choices(AMINO_ACIDS, k=length)) for length in lengths]
    from sae_engine.esm.fasta import load_fasta

    if fasta is None:
        from sae_engine.esm.datadir import data_dir

        fasta = str(data_dir() / "human.fasta")
    records = load_fasta(fasta)
    if len(records) < count:
        raise ValueError(f"{fasta} holds {len(records)} proteins, fewer than --proteins {count}")
    return [r.sequence[:MAX_RESIDUES] for r in rng.sample(records, count)]


@functools.cache
def load_model(spec: str, device: str) -> tuple[Any, Any]:
    """(fair-esm ESM2 in eval mode on ``device``, its alphabet) for a spec (see the module doc);
    loaded once per process (no contender changes it)."""
    if spec.startswith("random:"):
        import esm

        from sae_engine.esm.models import random_esm2

        try:
            layers, dim, heads = (int(part) for part in spec.removeprefix("random:").split(","))
        except ValueError:
            raise ValueError(f"--model {spec!r}: expected random:LAYERS,DIM,HEADS, e.g. random:6,320,20") from None
        model, alphabet = random_esm2(layers, dim, heads), esm.data.Alphabet.from_architecture("ESM-1b")
    else:
        from sae_engine.esm.models import load_esm2

        model, alphabet = load_esm2(spec)
    return model.eval().to(device), alphabet


def fair_esm_loop(model: Any, alphabet: Any, sequences: list[str], layers: list[int],
                  bf16: bool = False) -> dict[int, list[torch.Tensor]]:
    """fair-esm's extract script's loop (optionally under bf16 autocast); -> {layer: per-protein [len, E]}."""
    import esm

    device = next(model.parameters()).device
    dataset = esm.data.FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
    batches = dataset.get_batch_indices(TOKENS_PER_BATCH, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(dataset, collate_fn=alphabet.get_batch_converter(MAX_RESIDUES),
                                         batch_sampler=batches)
    out: dict[int, list[torch.Tensor]] = {layer: [None] * len(sequences) for layer in layers}  # type: ignore[list-item]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for labels, strs, toks in loader:
            reps = model(toks.to(device), repr_layers=layers, return_contacts=False)["representations"]
            for i, label in enumerate(labels):
                for layer in layers:
                    out[layer][int(label)] = reps[layer][i, 1 : len(strs[i]) + 1].float().clone()
    return out


def ours_loop(model: Any, alphabet: Any, sequences: list[str], layers: list[int], bf16: bool) -> dict[int, list[torch.Tensor]]:
    """The engine's extraction of the same proteins; -> {layer: per-protein [len, E]}."""
    from sae_engine.esm.extract import embed

    rows = embed(model, alphabet, sequences, layers, max_tokens=TOKENS_PER_BATCH, bf16=bf16)
    return {layer: [r[layer] for r in rows] for layer in layers}


def _run(name: str, model: Any, alphabet: Any, sequences: list[str], layers: list[int]) -> Any:
    if name.startswith("fair-esm"):
        return fair_esm_loop(model, alphabet, sequences, layers, bf16=name == "fair-esm-bf16")
    return ours_loop(model, alphabet, sequences, layers, bf16=name == "ours-bf16")


def _setup_contender(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], None]:
    """Time one contender (after a warm-up on a few proteins); ready = its result dict."""
    if name in ("fair-esm+malloc", "ours-fp32", "ours-bf16") and options["device"] == "cpu":
        from sae_engine.memory import tune_allocator

        tune_allocator()
    model, alphabet = load_model(options["model"], options["device"])
    sequences = sample_sequences(options["proteins"], options["seed"], options["fasta"], options["synthetic"])
    layers = options["layers"]
    _run(name, model, alphabet, sequences[:8], layers)
    if options["device"] == "cuda":
        torch.cuda.synchronize()
    started, cpu_started = time.perf_counter(), time.process_time()
    _run(name, model, alphabet, sequences, layers)
    if options["device"] == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    residues = sum(map(len, sequences))
    # CPU time is the steadier measure on a shared machine (waiting for a core is not counted).
    return {"contender": name, "proteins": len(sequences), "residues": residues, "seconds": seconds,
            "cpu_seconds": cpu_seconds, "residues_per_s": residues / seconds,
            "residues_per_cpu_s": residues / cpu_seconds, "threads": torch.get_num_threads()}, None


def run_all(contenders: tuple[str, ...], options: dict[str, Any], isolate: bool = True) -> list[dict[str, Any]]:
    """Each contender (in a fresh process when ``isolate``); speedups over the faster fair-esm setting."""
    rows = []
    for name in contenders:
        try:
            rows.append(run_once(_setup_contender, name, options, isolate=isolate))
        except Exception as err:  # a contender that cannot run here (e.g. no CUDA path) is a row with a note
            rows.append({"contender": name, "note": f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"})
    measured = [r for r in rows if r["contender"] in BASELINES and "residues_per_s" in r]
    baseline = max(measured, key=lambda r: r["residues_per_s"]) if measured else None
    for row in rows:
        if baseline is not None and "residues_per_s" in row:
            row["speedup"] = row["residues_per_s"] / baseline["residues_per_s"]
            row["cpu_speedup"] = row["residues_per_cpu_s"] / baseline["residues_per_cpu_s"]
    return rows


def auto_vs_faster(rows: list[dict[str, Any]], auto_dtype: str) -> dict[str, Any] | None:
    """Which of ours-fp32 / ours-bf16 ``precision = "auto"`` picks here, against the faster."""
    ours = {r["contender"]: r for r in rows if r["contender"] in ("ours-fp32", "ours-bf16") and "residues_per_s" in r}
    picked = ours.get(f"ours-{auto_dtype}")
    if picked is None or len(ours) < 2:
        return None
    faster = max(ours.values(), key=lambda r: r["residues_per_s"])
    ratio = faster["residues_per_s"] / picked["residues_per_s"]  # time at auto / time at the faster
    return {"auto": picked["contender"], "faster": faster["contender"], "auto_over_faster": ratio,
            "within_10_percent": ratio <= 1.10}


def accuracy(options: dict[str, Any], count: int) -> dict[str, float]:
    """Max abs and relative Frobenius error of ours (fp32, bf16) and fair-esm-bf16 against fair-esm fp32."""
    model, alphabet = load_model(options["model"], options["device"])
    sequences = sample_sequences(count, options["seed"], options["fasta"], options["synthetic"])
    layers = options["layers"]
    reference = fair_esm_loop(model, alphabet, sequences, layers)
    result = {}
    for label in ("ours-fp32", "ours-bf16", "fair-esm-bf16"):
        try:
            got = _run(label, model, alphabet, sequences, layers)
        except Exception:  # its throughput row already carries the reason
            continue
        for layer in layers:
            want, have = torch.cat(reference[layer]).cpu(), torch.cat(got[layer]).float().cpu()
            result[f"{label}_L{layer}_max_abs"] = (have - want).abs().max().item()
            result[f"{label}_L{layer}_rel_fro"] = ((have - want).norm() / want.norm()).item()
    return result


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-engine bench esm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--proteins", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default="3,6")
    parser.add_argument("--model", default="default", help="weights spec (see sae-engine extract) or random:LAYERS,DIM,HEADS")
    parser.add_argument("--fasta", help="proteins to sample (default: the prepared human proteome)")
    parser.add_argument("--random-sequences", action="store_true", help="random residues at human-like lengths")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, of {', '.join(CONTENDERS)}")
    parser.add_argument("--accuracy-proteins", type=int, default=24, help="proteins in the accuracy check (0: skip)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--in-process", action="store_true", help="every contender in this process (default on CUDA; quick checks on the CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    try:
        args.layer_list = [int(x) for x in args.layers.split(",")]
    except ValueError:
        parser.error(f"--layers {args.layers!r}: expected comma-separated integers")
    args.contender_list = tuple(args.contenders.split(","))
    bad = [c for c in args.contender_list if c not in CONTENDERS]
    if bad:
        parser.error(f"--contenders: unknown {bad}; choose from {list(CONTENDERS)}")
    if args.proteins < 1:
        parser.error("--proteins must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if importlib.util.find_spec("esm") is None:
        print("sae-engine bench esm: error: needs the 'esm' extra (module 'esm' is missing): "
              "pip install 'sae-engine[esm]'", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sae-engine bench esm: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"model": args.model, "device": args.device, "proteins": args.proteins, "seed": args.seed,
               "fasta": args.fasta, "synthetic": args.random_sequences, "layers": args.layer_list}
    try:  # fail early, in this process, on a missing model or FASTA
        load_model(args.model, args.device)
        sample_sequences(args.proteins, args.seed, args.fasta, args.random_sequences)
    except (OSError, ValueError) as err:
        print(f"sae-engine bench esm: error: {err}", file=sys.stderr)
        return 2
    info = machine_info(args.device, ("fair-esm",))
    rows = run_all(args.contender_list, options, isolate=args.device == "cpu" and not args.in_process)
    auto = auto_vs_faster(rows, info["auto_precision"])
    errors = accuracy(options, min(args.proteins, args.accuracy_proteins)) if args.accuracy_proteins else {}
    if args.json:
        print_json({"suite": "esm", "machine": info, "model": args.model, "layers": args.layer_list,
                    "sequences": "random" if args.random_sequences else (args.fasta or "prepared human proteome"),
                    "throughput": rows, "auto_vs_faster": auto, "accuracy": errors})
        return 0
    print(machine_line(info))
    first = next((r for r in rows if "residues" in r), {})
    print(f"{'contender':<20} {'residues/s':>11} {'speedup':>8} {'res/CPU-s':>10} {'speedup':>8}   "
          f"({first.get('proteins')} proteins, {first.get('residues', 0):,} residues, layers {args.layers}, model "
          f"{args.model}, {first.get('threads')} threads; speedup over fair-esm at its faster setting)")
    for row in rows:
        if "residues_per_s" not in row:
            print(f"{row['contender']:<20} {row['note']}")
            continue
        print(f"{row['contender']:<20} {row['residues_per_s']:>11,.0f} {row.get('speedup', 0):>7.2f}x"
              f" {row['residues_per_cpu_s']:>10,.0f} {row.get('cpu_speedup', 0):>7.2f}x")
    if auto:
        print(f"auto picks {auto['auto']} here; the faster is {auto['faster']}: auto takes "
              f"{auto['auto_over_faster']:.2f}x the time; within 10 %: {'yes' if auto['within_10_percent'] else 'NO'}")
    if errors:
        print("error vs fair-esm fp32: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return 0
