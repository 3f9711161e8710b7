"""Training-step benchmark: ``sae-engine bench train-step [options]``.

Times one full training step (forward, backward, optimizer) of the engine's SAE against the
libraries people would otherwise train with, in the same run, each in every setting it has:

* ``ours``: the engine's backend (``train_step(x, x, lr)``) built from a ``RunConfig``, at
  ``precision`` = ``auto`` (the default: decided by the hardware), ``bf16`` and ``fp32``, with
  each requested optimizer. The summary prints the default's step time over the faster of bf16
  and fp32: the default should be within 10 % of it on every machine.
* ``gemm``: the bare encoder GEMM ``x @ W_enc.T`` in bf16 and fp32, into a reused output
  buffer: the dense floor of a TopK step (``x GEMM`` = step time / the GEMM in the step's
  compute dtype).
* ``sparsify``: EleutherAI's ``SparseCoder`` trained as its trainer does (decoder renormalised,
  forward, FVU backward, parallel gradient removed, ``torch.optim.Adam``), under bf16 autocast
  and in fp32.
* ``saelens``: SAELens' ``TopKTrainingSAE`` trained as its ``SAETrainer._train_step`` does
  (``training_forward_pass``, firing statistics, backward, gradient clipping, Adam), under
  bf16 autocast and in fp32.

Each peer is compared at its faster setting on this machine. All contenders see the same batch
every step and start without dead latents, so no one runs an AuxK pass (the engine switches it
off as its trainer does after its first statistics window).

On the CPU each contender lives in its own spawned process (:mod:`.harness`), so its peak memory
is its own: the peak resident set above the level before its model was built (libraries already
imported). On CUDA they share this process and ``torch.cuda.max_memory_allocated`` above the
level before each was built is its own. ``peak MiB`` thus holds
parameters, optimizer state and the step's temporaries; ``step+ MiB`` only the temporaries.
Steps are timed round-robin across the processes (one step of each in turn) and medians are
kept, so background load hits every contender alike; ``--sequential`` holds one contender at a
time instead, for sizes where all of them do not fit in memory together.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .harness import (MIB, MemoryProbe, Unavailable, fmt, machine_info, machine_line, open_contender,
                      print_json, timed)

PEERS = {"sparsify": "sparsify", "saelens": "sae_lens"}  # peer name -> import name
# SAELens' use_sparse_activations (fp32) is left out: its backward fails on torch 2.13 CPU
# ("Could not run 'aten::view' with arguments from the 'SparseCPU' backend").
PEER_SETTINGS = ("bf16", "fp32")
PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adam", "row_sparse_adam")
DEFAULT_TOLERANCE = 1.10  # the default step may take at most 10 % longer than the faster setting

Step = Callable[[], Any]  # one training step; returns the loss (a 0-d tensor or array) or None


@dataclass(frozen=True)
class Spec:
    """What every contender trains: batch x[batch, d_in], n latents, top k."""

    d_in: int
    n_latents: int
    k: int
    batch: int
    device: str
    backend: str  # "torch" | "jax"
    seed: int = 0

    @property
    def lr(self) -> float:
        """Gao et al.'s width-scaled rate (the engine's and sparsify's default)."""
        return 2e-4 / (self.n_latents / 2**14) ** 0.5


@dataclass(frozen=True)
class Case:
    """One contender in one setting: ``ours`` (precision auto|bf16|fp32, an optimizer),
    ``gemm`` or a peer (precision bf16|fp32)."""

    contender: str
    precision: str
    optimizer: str = ""

    @property
    def label(self) -> str:
        return " ".join(part for part in (self.contender, self.precision, self.optimizer) if part)


@dataclass
class Row:
    """One measured contender. Times in seconds, memory in bytes."""

    contender: str
    precision: str
    optimizer: str
    compute_dtype: str  # what the precision means on this machine ("auto" resolved)
    step_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    over_gemm: float | None = None  # step time / bare GEMM time in the same compute dtype
    peak_mem_bytes: int | None = None  # parameters + optimizer state + step temporaries
    step_mem_bytes: int | None = None  # temporaries of one step
    loss_first: float | None = None
    loss_last: float | None = None
    note: str = ""


def compute_dtype(precision: str, device: str) -> str:
    """"bf16" or "fp32": what ``precision`` computes in on this machine."""
    from ..training.precision import resolve_precision

    return resolve_precision(precision, device).dtype if precision == "auto" else precision


# ---------------------------------------------------------------------------------------------
# Contenders: (spec, x) -> one training step.
# ---------------------------------------------------------------------------------------------


def make_batch(spec: Spec) -> torch.Tensor:
    """The synthetic batch [batch, d_in] (fp32) every contender trains on: a low-rank signal
    plus noise and an offset, so reconstruction has something to learn."""
    g = torch.Generator().manual_seed(spec.seed)
    rank = max(1, spec.d_in // 8)
    basis = torch.randn(rank, spec.d_in, generator=g)
    x = torch.randn(spec.batch, rank, generator=g) @ basis + 0.3 * torch.randn(spec.batch, spec.d_in, generator=g)
    return (x + 0.5).to(spec.device)


def engine_available(backend: str) -> str | None:
    """None when ``backend`` can run, else the reason it cannot."""
    if backend == "jax":
        if importlib.util.find_spec("jax") is None:
            return "--backend jax needs JAX (pip install 'sae-engine[jax]')"
        if importlib.util.find_spec("sae_engine.training.jax_backend") is None:
            return "--backend jax is not available yet: this install has no sae_engine.training.jax_backend"
    return None


def build_ours(spec: Spec, x: torch.Tensor, precision: str, optimizer: str) -> Step:
    """The engine's backend on this spec, as ``sae-engine train`` builds it."""
    from ..config import RunConfig
    from ..training.placement import make_backend

    if spec.device == "cpu":
        from ..memory import tune_allocator

        tune_allocator()  # as the train command does for its process
    config = RunConfig()
    config.model.d_in, config.model.n_latents, config.model.k = spec.d_in, spec.n_latents, spec.k
    config.train.backend, config.train.device = spec.backend, spec.device
    config.train.precision, config.train.optimizer = precision, optimizer
    config.train.batch_size, config.train.seed = spec.batch, spec.seed
    config.validate("bench")
    sae = make_backend(config, torch.device(spec.device))
    sae.initialize(x, x)
    sae.aux_active = False  # no dead latents yet: the trainer's loop turns AuxK off, as here
    lr = config.learning_rate
    return lambda: sae.train_step(x, x, lr)["loss"]


def build_gemm(spec: Spec, x: torch.Tensor, precision: str) -> Step:
    """The bare encoder GEMM ``x @ W_enc.T`` in ``precision``, into a reused buffer."""
    g = torch.Generator(device=spec.device).manual_seed(spec.seed)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    W = torch.randn(spec.n_latents, spec.d_in, generator=g, device=spec.device).to(dt)
    xc = x.to(dt)
    out = torch.empty(spec.batch, spec.n_latents, dtype=dt, device=spec.device)
    return lambda: torch.mm(xc, W.T, out=out)


def build_sparsify(spec: Spec, x: torch.Tensor, precision: str) -> Step:
    """sparsify's ``SparseCoder`` step as its trainer runs it (fvu loss, no dead latents)."""
    import sparsify

    cfg = sparsify.SparseCoderConfig(num_latents=spec.n_latents, k=spec.k)
    sae = sparsify.SparseCoder(spec.d_in, cfg, device=spec.device, dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))  # as its trainer does on the first step
    optimizer = torch.optim.Adam(sae.parameters(), lr=spec.lr)
    dead_mask = torch.zeros(spec.n_latents, dtype=torch.bool, device=spec.device)
    did_fire = torch.zeros(spec.n_latents, dtype=torch.bool, device=spec.device)
    autocast = torch.autocast(spec.device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> torch.Tensor:
        sae.set_decoder_norm_to_unit_norm()
        with autocast:
            out = sae(x, dead_mask=dead_mask)
            loss = out.fvu + out.auxk_loss / 32 + out.multi_topk_fvu / 8
        loss.backward()
        did_fire[out.latent_indices.flatten()] = True
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


def build_saelens(spec: Spec, x: torch.Tensor, precision: str) -> Step:
    """SAELens' ``TopKTrainingSAE`` step as ``SAETrainer._train_step`` runs it."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=spec.d_in, d_sae=spec.n_latents, k=spec.k, dtype="float32", device=spec.device)
    sae = TopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=spec.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(spec.n_latents, device=spec.device)
    act_freq = torch.zeros(spec.n_latents, device=spec.device)
    autocast = torch.autocast(spec.device, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step() -> torch.Tensor:
        sae.train()
        with autocast:
            out = sae.training_forward_pass(
                TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=since_fired > 1000,
                               n_training_steps=0, is_logging_step=False)
            )
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                since_fired.add_(1)[firing.sum(-2).bool()] = 0
                act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return out.loss.detach()

    return step


def import_libraries(case: Case, spec: Spec) -> None:
    """Import what a contender needs (raises Unavailable), so its peak memory leaves library code out."""
    if case.contender == "ours":
        reason = engine_available(spec.backend)
        if reason:
            raise Unavailable(reason)
        importlib.import_module("sae_engine.training.jax_backend" if spec.backend == "jax" else "sae_engine.training.trainer")
    elif case.contender in PEERS:
        if importlib.util.find_spec(PEERS[case.contender]) is None:
            raise Unavailable(f"{case.contender} is not installed (pip install 'sae-engine[bench]')")
        if case.contender == "sparsify" and spec.device != "cuda":
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
        importlib.import_module(PEERS[case.contender])


def build_step(case: Case, spec: Spec, x: torch.Tensor) -> Step:
    """The zero-argument training step of one contender (its libraries imported first)."""
    import_libraries(case, spec)
    if case.contender == "ours":
        return build_ours(spec, x, case.precision, case.optimizer)
    builder = {"gemm": build_gemm, "sparsify": build_sparsify, "saelens": build_saelens}[case.contender]
    return builder(spec, x, case.precision)


# ---------------------------------------------------------------------------------------------
# One contender in its process: build, warm up, measure one step's memory, time on request.
# ---------------------------------------------------------------------------------------------


def loss_value(result: Any) -> float | None:
    """A step's loss as a float (waits for it); None for steps without a loss."""
    if result is None or (isinstance(result, torch.Tensor) and result.ndim > 0):
        return None
    return float(result)


def _setup_contender(case: Case, spec: Spec, warmup: int) -> tuple[tuple[int, int, float | None], Callable[[], Any]]:
    """ready = (peak bytes above the level before the model was built, peak bytes above the level
    before one step, the first step's loss); run -> (seconds, loss) of one step."""
    x = make_batch(spec)
    import_libraries(case, spec)
    probe = MemoryProbe(spec.device)
    step = build_step(case, spec, x)
    first = loss_value(step())
    for _ in range(max(warmup - 1, 0)):
        step()
    probe.reset()
    before = probe.current()
    loss_value(timed(step, spec.device)[1])
    peak = probe.peak()

    def run() -> tuple[float, float | None]:
        seconds, result = timed(step, spec.device)
        return seconds, loss_value(result)

    return (peak - probe.baseline, max(0, peak - before), first), run


def _time_rounds(open_cases: dict[Case, Any], rows: dict[Case, Row], steps: int) -> None:
    """``steps`` rounds of one step per contender, round-robin."""
    for _ in range(steps):
        for case, contender in list(open_cases.items()):
            try:
                seconds, loss = contender.run()
            except RuntimeError as err:
                rows[case].note, rows[case].times_s = str(err), []
                open_cases.pop(case).close()
                continue
            rows[case].times_s.append(seconds)
            rows[case].loss_last = loss


def measure(cases: list[Case], spec: Spec, steps: int, warmup: int, sequential: bool = False,
            isolate: bool = True) -> list[Row]:
    """Build each case in its own process (one after another), then time ``steps`` rounds of
    one step per case, round-robin; medians per case. ``sequential``: build, time and close
    one case at a time, so only one contender's memory is held at once (timings then are not
    interleaved). ``isolate=False`` runs every case in this process (quick checks)."""
    rows = {case: Row(case.contender, case.precision, case.optimizer, compute_dtype(case.precision, spec.device))
            for case in cases}
    open_cases: dict[Case, Any] = {}
    try:
        for case in cases:
            try:
                open_cases[case] = contender = open_contender(_setup_contender, case, spec, warmup, isolate=isolate)
            except (Unavailable, RuntimeError) as err:
                rows[case].note = str(err).splitlines()[0] if str(err) else type(err).__name__
                continue
            rows[case].peak_mem_bytes, rows[case].step_mem_bytes, rows[case].loss_first = contender.ready
            if sequential:
                _time_rounds(open_cases, rows, steps)
                open_cases.pop(case).close()
        _time_rounds(open_cases, rows, steps)
    finally:
        for contender in open_cases.values():
            contender.close()
    for row in rows.values():
        if row.times_s:
            row.step_s = statistics.median(row.times_s)
            row.tokens_per_s = spec.batch / row.step_s
    gemm = {r.compute_dtype: r for r in rows.values() if r.contender == "gemm" and r.step_s}
    for row in rows.values():
        if row.step_s and row.compute_dtype in gemm:
            row.over_gemm = row.step_s / gemm[row.compute_dtype].step_s
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Summary and output.
# ---------------------------------------------------------------------------------------------


def default_vs_best(rows: list[Row], optimizer: str) -> dict[str, Any] | None:
    """Our default (auto) step against the faster of our bf16 and fp32 steps, one optimizer."""
    ours = {r.precision: r for r in rows if r.contender == "ours" and r.optimizer == optimizer and r.step_s}
    explicit = [ours[p] for p in ("bf16", "fp32") if p in ours]
    if "auto" not in ours or not explicit:
        return None
    best = min(explicit, key=lambda r: r.step_s)
    ratio = ours["auto"].step_s / best.step_s
    return {"optimizer": optimizer, "auto_dtype": ours["auto"].compute_dtype, "faster": best.precision,
            "auto_over_faster": ratio, "within_10_percent": ratio <= DEFAULT_TOLERANCE,
            "measured": sorted(ours)}


def compare(rows: list[Row], headline: Row | None) -> dict[str, dict[str, Any]]:
    """Per peer: its faster setting on this machine, and ``headline`` (our default) against it."""
    out: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        measured = [r for r in rows if r.contender == peer and r.tokens_per_s]
        if not measured:
            continue
        best = max(measured, key=lambda r: r.tokens_per_s)
        entry: dict[str, Any] = {"faster_setting": best.precision, "tokens_per_s": best.tokens_per_s,
                                 "peak_mem_mib": best.peak_mem_bytes / MIB,
                                 "settings": {r.precision: r.tokens_per_s for r in measured}}
        if headline is not None and headline.tokens_per_s:
            entry["speedup"] = headline.tokens_per_s / best.tokens_per_s
            entry["mem_ratio_vs_faster"] = headline.peak_mem_bytes / best.peak_mem_bytes
            entry["lower_peak_mem_than_every_setting"] = all(headline.peak_mem_bytes < r.peak_mem_bytes for r in measured)
        out[peer] = entry
    return out


def format_table(rows: list[Row]) -> str:
    """The readable table, one row per contender and setting."""
    lines = [f"{'contender':<10} {'precision':<11} {'optimizer':<16} {'step ms':>9} {'tokens/s':>10} {'x GEMM':>7} "
             f"{'peak MiB':>9} {'step+ MiB':>9} {'loss first -> last':>20}  note"]
    for r in rows:
        loss = "-" if r.loss_first is None else f"{r.loss_first:.4g} -> {fmt(r.loss_last, '.4g')}"
        precision = f"auto={r.compute_dtype}" if r.precision == "auto" else r.precision
        lines.append(
            f"{r.contender:<10} {precision:<11} {r.optimizer or '-':<16} {fmt(r.step_s, '9.1f', 1e3)} "
            f"{fmt(r.tokens_per_s, '10.0f')} {fmt(r.over_gemm, '7.2f')} {fmt(r.peak_mem_bytes, '9.0f', 1 / MIB)} "
            f"{fmt(r.step_mem_bytes, '9.0f', 1 / MIB)} {loss:>20}  {r.note}"
        )
    return "\n".join(lines)


def format_summary(default: dict[str, Any] | None, peers: dict[str, dict[str, Any]], headline: Row | None) -> str:
    lines = []
    if default:
        verdict = "within 10 %: yes" if default["within_10_percent"] else "within 10 %: NO"
        lines.append(f"default step (auto = {default['auto_dtype']}) / faster of bf16 and fp32 "
                     f"({default['faster']}): {default['auto_over_faster']:.2f}x the time; {verdict}")
    for peer, entry in peers.items():
        if "speedup" in entry:
            lines.append(f"ours ({headline.precision}, {headline.optimizer}) vs {peer} at its faster setting ({entry['faster_setting']}): "
                         f"{entry['speedup']:.2f}x tokens/s, peak memory {entry['mem_ratio_vs_faster']:.2f}x")
    return "\n".join(lines)


def _csv(parser: argparse.ArgumentParser, value: str, allowed: tuple[str, ...] | dict[str, str], flag: str) -> list[str]:
    items = [] if value == "none" else value.split(",")
    bad = [v for v in items if v not in allowed]
    if bad:
        parser.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return items


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-engine bench train-step", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="torch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-in", type=int, default=320)
    parser.add_argument("--n-latents", type=int, default=10240)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--precision", default=",".join(PRECISIONS),
                        help="our precisions, comma-separated (auto, bf16, fp32; the first is the headline)")
    parser.add_argument("--optimizer", default="adam",
                        help="adam, row_sparse_adam, or both comma-separated (the first is the headline)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender (interleaved)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--peers", default="sparsify,saelens", help="comma-separated peers, or 'none'")
    parser.add_argument("--sequential", action="store_true",
                        help="one contender in memory at a time (large n on small machines; not interleaved)")
    parser.add_argument("--in-process", action="store_true",
                        help="every contender in this process (default on CUDA; on the CPU peak memory then mixes contenders)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    args.precisions = _csv(parser, args.precision, PRECISIONS, "--precision")
    args.optimizers = _csv(parser, args.optimizer, OPTIMIZERS, "--optimizer")
    args.peer_names = _csv(parser, args.peers, PEERS, "--peers")
    if not args.precisions or not args.optimizers:
        parser.error("--precision and --optimizer need at least one value")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    return args


def cases_for(args: argparse.Namespace) -> list[Case]:
    """Ours in every precision x optimizer, the GEMM in each compute dtype ours uses, the peers in each setting."""
    cases = [Case("ours", p, opt) for opt in args.optimizers for p in args.precisions]
    dtypes = dict.fromkeys(compute_dtype(p, args.device) for p in args.precisions)
    cases += [Case("gemm", dtype) for dtype in dtypes]
    cases += [Case(peer, setting) for peer in args.peer_names for setting in PEER_SETTINGS]
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table, or one JSON object with --json."""
    args = _parse(argv)
    reason = engine_available(args.backend)
    if reason:
        print(f"sae-engine bench train-step: error: {reason}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sae-engine bench train-step: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    spec = Spec(args.d_in, args.n_latents, args.k, args.batch, args.device, args.backend)
    info = machine_info(args.device, ("jax", "eai-sparsify", "sae-lens"))
    isolate = args.device == "cpu" and not args.in_process  # CUDA: the allocator's peak is per contender anyway
    rows = measure(cases_for(args), spec, args.steps, args.warmup, args.sequential, isolate=isolate)
    headline = rows[0]
    if headline.step_s is None:
        print(f"sae-engine bench train-step: error: our step ({headline.contender} {headline.precision} "
              f"{headline.optimizer}) failed: {headline.note}", file=sys.stderr)
        return 1
    default = default_vs_best(rows, args.optimizers[0])
    peers = compare(rows, headline)
    if args.json:
        print_json({
            "suite": "train-step", "machine": info, "spec": asdict(spec),
            "headline": {"precision": headline.precision, "compute_dtype": headline.compute_dtype,
                         "optimizer": headline.optimizer, "tokens_per_s": headline.tokens_per_s,
                         "step_ms": headline.step_s * 1e3, "step_over_gemm": headline.over_gemm,
                         "peak_mem_mib": headline.peak_mem_bytes / MIB},
            "default_vs_faster": default, "peers": peers,
            "steps": args.steps, "warmup": args.warmup, "interleaved": not args.sequential,
            "rows": [asdict(r) for r in rows],
        })
        return 0
    print(machine_line(info))
    print(f"B={spec.batch} d={spec.d_in} n={spec.n_latents} k={spec.k} backend={spec.backend} device={spec.device}; "
          f"medians of {args.steps} {'sequential' if args.sequential else 'interleaved'} steps after {args.warmup} warm-up")
    print(format_table(rows))
    print(format_summary(default, peers, headline))
    return 0
