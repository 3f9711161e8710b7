"""ESM2 extraction throughput: fair-esm's own loop against ``sae_engine.esm.extract``.

``python -m bench.esm_bench [--proteins 100] [--layers 3,6] [--json]`` after ``sae-engine data
prepare``. Every contender runs in a fresh process (allocator state and caches do not leak from
one to the next) on the same random sample of real human proteins (cropped to 1022 residues):

- ``fair-esm``: the loop of fair-esm's ``scripts/extract.py``: ``FastaBatchedDataset``, length-sorted
  batches of 4096 tokens, ``model(tokens, repr_layers=...)`` under ``no_grad``, per-protein clones;
- ``fair-esm+malloc``: the same after :func:`~sae_engine.memory.tune_allocator`;
- ``ours-fp32`` (without and with the allocator setting) and ``ours-bf16``: :class:`FastESM2`
  with the same batching budget, residue rows gathered per batch.

Accuracy is checked in-process against fair-esm's fp32 output on a subset.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CONTENDERS = ("fair-esm", "fair-esm+malloc", "ours-fp32-nomalloc", "ours-fp32", "ours-bf16")
TOKENS_PER_BATCH = 4096


def sample_sequences(count: int, seed: int = 0, data_dir: str | None = None) -> list[str]:
    """``count`` random human proteins from the prepared data, truncated to 1022 residues."""
    from sae_engine.esm.fasta import load_fasta
    from sae_engine.esm.prepare import data_dir as resolve

    records = load_fasta(resolve(data_dir) / "human.fasta")
    picked = random.Random(seed).sample(records, count)
    return [r.sequence[:1022] for r in picked]


def fair_esm_loop(model: Any, alphabet: Any, sequences: list[str], layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """fair-esm's extract script's loop; -> {layer: per-protein [len, E] clones}."""
    import esm

    dataset = esm.data.FastaBatchedDataset([str(i) for i in range(len(sequences))], sequences)
    batches = dataset.get_batch_indices(TOKENS_PER_BATCH, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(
        dataset, collate_fn=alphabet.get_batch_converter(1022), batch_sampler=batches
    )
    out: dict[int, list[torch.Tensor]] = {layer: [None] * len(sequences) for layer in layers}  # type: ignore[list-item]
    with torch.no_grad():
        for labels, strs, toks in loader:
            reps = model(toks, repr_layers=layers, return_contacts=False)["representations"]
            for i, label in enumerate(labels):
                for layer in layers:
                    out[layer][int(label)] = reps[layer][i, 1 : len(strs[i]) + 1].clone()
    return out


def ours_loop(model: Any, alphabet: Any, sequences: list[str], layers: list[int], bf16: bool) -> dict[int, list[torch.Tensor]]:
    """The engine's extraction of the same proteins; -> {layer: per-protein [len, E]}."""
    from sae_engine.esm.extract import embed

    rows = embed(model, alphabet, sequences, layers, max_tokens=TOKENS_PER_BATCH, bf16=bf16)
    return {layer: [r[layer] for r in rows] for layer in layers}


def run_one(name: str, count: int, seed: int, layers: list[int], data_dir: str | None, threads: int | None = None) -> dict[str, Any]:
    """Time one contender in this process (after a warm-up on a few proteins)."""
    from sae_engine.memory import tune_allocator
    from sae_engine.esm.models import load_esm2

    if threads:
        torch.set_num_threads(threads)
    if name in ("fair-esm+malloc", "ours-fp32", "ours-bf16"):
        tune_allocator()
    model, alphabet = load_esm2("default", data_dir=data_dir)
    sequences = sample_sequences(count, seed, data_dir)

    def loop(seqs: list[str]) -> Any:
        if name.startswith("fair-esm"):
            return fair_esm_loop(model, alphabet, seqs, layers)
        return ours_loop(model, alphabet, seqs, layers, bf16=name == "ours-bf16")

    loop(sequences[:8])
    started, cpu_started = time.perf_counter(), time.process_time()
    loop(sequences)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    residues = sum(map(len, sequences))
    # CPU time is the steadier measure on a shared machine (waiting for a core is not counted).
    return {"contender": name, "proteins": count, "residues": residues, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "residues_per_s": residues / seconds, "residues_per_cpu_s": residues / cpu_seconds,
            "threads": torch.get_num_threads()}


def accuracy(count: int, seed: int, layers: list[int], data_dir: str | None) -> dict[str, float]:
    """Max abs error and relative Frobenius error of ours (fp32, bf16) against fair-esm fp32."""
    from sae_engine.esm.models import load_esm2

    model, alphabet = load_esm2("default", data_dir=data_dir)
    sequences = sample_sequences(count, seed, data_dir)
    reference = fair_esm_loop(model, alphabet, sequences, layers)
    result = {}
    for label, bf16 in (("fp32", False), ("bf16", True)):
        got = ours_loop(model, alphabet, sequences, layers, bf16)
        for layer in layers:
            want, have = torch.cat(reference[layer]), torch.cat(got[layer])
            result[f"{label}_L{layer}_max_abs"] = (have - want).abs().max().item()
            result[f"{label}_L{layer}_rel_fro"] = ((have - want).norm() / want.norm()).item()
    return result


def run_subprocess(name: str, count: int = 100, seed: int = 0, layers: list[int] | None = None,
                   data_dir: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """:func:`run_one` in a fresh Python process; -> its result dict."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "bench.esm_bench", "--one", name, "--proteins", str(count), "--seed", str(seed),
               "--layers", ",".join(map(str, layers or [3, 6]))]
    command += (["--data-dir", data_dir] if data_dir else []) + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(count: int = 100, seed: int = 0, layers: list[int] | None = None, data_dir: str | None = None,
            contenders: tuple[str, ...] = CONTENDERS, threads: int | None = None) -> list[dict[str, Any]]:
    """Each contender in a subprocess; -> one result dict per contender, with speedup over the first."""
    rows = [run_subprocess(name, count, seed, layers, data_dir, threads) for name in contenders]
    for row in rows:
        row["speedup"] = row["residues_per_s"] / rows[0]["residues_per_s"]
        row["cpu_speedup"] = row["residues_per_cpu_s"] / rows[0]["residues_per_cpu_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.esm_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--proteins", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", default="3,6")
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]
    if args.one:
        print(json.dumps(run_one(args.one, args.proteins, args.seed, layers, args.data_dir, args.threads)))
        return 0
    rows = run_all(args.proteins, args.seed, layers, args.data_dir, threads=args.threads)
    errors = accuracy(min(args.proteins, 24), args.seed, layers, args.data_dir)
    if args.json:
        print(json.dumps({"throughput": rows, "accuracy": errors}, indent=1))
        return 0
    print(f"{'contender':<20} {'residues/s':>11} {'speedup':>8} {'res/CPU-s':>10} {'speedup':>8}   ({rows[0]['proteins']}"
          f" human proteins, {rows[0]['residues']:,} residues, layers {args.layers}, {rows[0]['threads']} threads)")
    for row in rows:
        print(f"{row['contender']:<20} {row['residues_per_s']:>11,.0f} {row['speedup']:>7.2f}x"
              f" {row['residues_per_cpu_s']:>10,.0f} {row['cpu_speedup']:>7.2f}x")
    print("error vs fair-esm fp32: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
