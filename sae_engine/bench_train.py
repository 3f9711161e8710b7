"""Training-step benchmark: ``sae-engine bench train-step [options]``.

Times one full training step (forward, backward, optimizer) of the engine's SAE against the
libraries people would otherwise train with, in the same run:

* ``ours``: the engine's backend (``train_step(x, x, lr)``) built from a ``RunConfig``, in the
  requested precision (``auto`` = bf16 compute with fp32 master weights) and optimizer(s).
* ``gemm``: the bare encoder GEMM ``x @ W_enc.T`` in the same compute dtype, into a reused
  output buffer: the dense floor of a TopK step (``x GEMM`` column = step time / GEMM time).
* ``sparsify``: EleutherAI's ``SparseCoder`` trained as its trainer does (decoder renormalised,
  forward, FVU backward, parallel gradient removed, ``torch.optim.Adam``), under bf16 autocast
  and in fp32.
* ``saelens``: SAELens' ``TopKTrainingSAE`` trained as its ``SAETrainer._train_step`` does
  (``training_forward_pass``, firing statistics, backward, gradient clipping, Adam), under
  bf16 autocast and in fp32.

All contenders see the same batch every step and start without dead latents, so no one runs
an AuxK pass (the engine switches it off as its trainer does after its first statistics window).

Each contender lives in its own spawned process, so its peak memory is its own: on CPU the
peak resident set above the level before its model was built (libraries already imported) (``VmHWM``, reset after warm-up),
on CUDA ``torch.cuda.max_memory_allocated``. ``peak MiB`` thus holds parameters, optimizer
state and the step's temporaries; ``step+ MiB`` only the temporaries. Steps are timed
round-robin across the processes (one step of each in turn) and medians are kept, so
background load hits every contender alike; ``--sequential`` holds one contender at a time
instead, for sizes where all of them do not fit in memory together.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .workers import SpawnedWorker, Unavailable

PEERS = {"sparsify": "sparsify", "saelens": "sae_lens"}  # peer name -> import name
# SAELens' use_sparse_activations (fp32) is left out: its backward fails on torch 2.13 CPU
# ("Could not run 'aten::view' with arguments from the 'SparseCPU' backend").
PEER_SETTINGS = {"sparsify": ("bf16", "fp32"), "saelens": ("bf16", "fp32")}
OPTIMIZERS = ("adam", "row_sparse_adam")
MIB = 1 << 20

Step = Callable[[], Any]  # one training step; returns the loss (a 0-d tensor or array) or None


@dataclass(frozen=True)
class Spec:
    """What every contender trains: batch x[batch, d_in], n latents, top k."""

    d_in: int
    n_latents: int
    k: int
    batch: int
    device: str
    precision: str  # "auto" | "bf16" | "fp32"
    backend: str  # "torch" | "jax"
    seed: int = 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "fp32" else torch.bfloat16

    @property
    def lr(self) -> float:
        """Gao et al.'s width-scaled rate (the engine's and sparsify's default)."""
        return 2e-4 / (self.n_latents / 2**14) ** 0.5


@dataclass(frozen=True)
class Case:
    """One contender: ``ours`` (setting = optimizer), ``gemm``, or a peer (setting = precision)."""

    contender: str
    setting: str

    @property
    def label(self) -> str:
        return f"{self.contender} {self.setting}"


@dataclass
class Row:
    """One measured contender. Times in seconds, memory in bytes."""

    contender: str
    setting: str
    step_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    tokens_per_s: float | None = None
    over_gemm: float | None = None  # step time / bare GEMM time
    peak_mem_bytes: int | None = None  # parameters + optimizer state + step temporaries
    step_mem_bytes: int | None = None  # temporaries of one step
    loss_first: float | None = None
    loss_last: float | None = None
    note: str = ""


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
        if importlib.util.find_spec("sae_engine.jax_backend") is None:
            return "--backend jax is not available yet: this install has no sae_engine.jax_backend"
    return None


def build_ours(spec: Spec, x: torch.Tensor, optimizer: str) -> Step:
    """The engine's backend (any with ``initialize`` and ``train_step(x, y, lr)``) on this spec."""
    from .config import RunConfig
    from .trainer import make_backend

    config = RunConfig()
    config.model.d_in, config.model.n_latents, config.model.k = spec.d_in, spec.n_latents, spec.k
    config.train.backend, config.train.device = spec.backend, spec.device
    config.train.precision, config.train.optimizer = spec.precision, optimizer
    config.train.batch_size, config.train.seed = spec.batch, spec.seed
    config.validate("bench")
    if spec.device == "cpu":  # its own worker process: tuned as the CLI tunes a training process
        from .memory import tune_allocator

        tune_allocator()
    sae = make_backend(config, torch.device(spec.device))
    sae.initialize(x, x)
    sae.aux_active = False  # no dead latents yet: the trainer's loop turns AuxK off, as here
    lr = config.learning_rate
    return lambda: sae.train_step(x, x, lr)["loss"]


def build_gemm(spec: Spec, x: torch.Tensor) -> Step:
    """The bare encoder GEMM ``x @ W_enc.T`` in the compute dtype, into a reused buffer."""
    g = torch.Generator(device=spec.device).manual_seed(spec.seed)
    dt = spec.compute_dtype
    W = torch.randn(spec.n_latents, spec.d_in, generator=g, device=spec.device).to(dt)
    xc = x.to(dt)
    out = torch.empty(spec.batch, spec.n_latents, dtype=dt, device=spec.device)
    return lambda: torch.mm(xc, W.T, out=out)


def build_sparsify(spec: Spec, x: torch.Tensor, setting: str) -> Step:
    """sparsify's ``SparseCoder`` step as its trainer runs it (fvu loss, no dead latents)."""
    import_libraries(Case("sparsify", setting), spec)
    import sparsify

    cfg = sparsify.SparseCoderConfig(num_latents=spec.n_latents, k=spec.k)
    sae = sparsify.SparseCoder(spec.d_in, cfg, device=spec.device, dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))  # as its trainer does on the first step
    optimizer = torch.optim.Adam(sae.parameters(), lr=spec.lr)
    dead_mask = torch.zeros(spec.n_latents, dtype=torch.bool, device=spec.device)
    did_fire = torch.zeros(spec.n_latents, dtype=torch.bool, device=spec.device)
    autocast = torch.autocast(spec.device, dtype=torch.bfloat16, enabled=setting == "bf16")

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


def build_saelens(spec: Spec, x: torch.Tensor, setting: str) -> Step:
    """SAELens' ``TopKTrainingSAE`` step as ``SAETrainer._train_step`` runs it."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=spec.d_in, d_sae=spec.n_latents, k=spec.k, dtype="float32", device=spec.device)
    sae = TopKTrainingSAE(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=spec.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(spec.n_latents, device=spec.device)
    act_freq = torch.zeros(spec.n_latents, device=spec.device)
    autocast = torch.autocast(spec.device, dtype=torch.bfloat16, enabled=setting == "bf16")

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
    """Import what a contender needs, so its peak memory can leave library code out."""
    if case.contender == "ours" and engine_available(spec.backend) is None:
        importlib.import_module("sae_engine.jax_backend" if spec.backend == "jax" else "sae_engine.trainer")
    elif case.contender in PEERS and importlib.util.find_spec(PEERS[case.contender]) is not None:
        if case.contender == "sparsify" and spec.device != "cuda":
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its Triton decoder needs CUDA
        importlib.import_module(PEERS[case.contender])


def build_step(case: Case, spec: Spec, x: torch.Tensor) -> Step:
    """The zero-argument training step of one contender."""
    if case.contender == "ours":
        reason = engine_available(spec.backend)
        if reason:
            raise Unavailable(reason)
        return build_ours(spec, x, case.setting)
    if case.contender == "gemm":
        return build_gemm(spec, x)
    if importlib.util.find_spec(PEERS[case.contender]) is None:
        raise Unavailable(f"{case.contender} is not installed")
    builder = {"sparsify": build_sparsify, "saelens": build_saelens}[case.contender]
    return builder(spec, x, case.setting)


# ---------------------------------------------------------------------------------------------
# Timing and memory.
# ---------------------------------------------------------------------------------------------


def loss_value(result: Any) -> float | None:
    """A step's loss as a float (waits for it); None for steps without a loss."""
    if result is None or (isinstance(result, torch.Tensor) and result.ndim > 0):
        return None
    return float(result)


def synchronize(device: str, result: Any) -> None:
    """Wait until the step's work is done (CUDA queue, JAX async dispatch)."""
    if hasattr(result, "block_until_ready"):
        result.block_until_ready()
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Step, device: str) -> tuple[float, Any]:
    """(wall seconds of one step including its queued work, the step's result)."""
    synchronize(device, None)
    t0 = time.perf_counter()
    result = step()
    synchronize(device, result)
    return time.perf_counter() - t0, result


def _status_bytes(name: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


class MemoryProbe:
    """Peak memory of this process above a baseline: CUDA allocator statistics, or the
    resident set's high-water mark on CPU (reset through /proc/self/clear_refs)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.baseline = self.current()

    def current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        import psutil

        return psutil.Process().memory_info().rss

    def reset(self) -> None:
        """Forget earlier peaks; freed heap goes back to the OS so the RSS is live data."""
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass  # the high-water mark then also holds construction

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        import resource

        hwm = _status_bytes("VmHWM")
        return hwm if hwm is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker(conn: Any, case: Case, spec: Spec, warmup: int, threads: int) -> None:
    """Build one contender, warm it up, measure one step's memory, then time steps on request."""
    sys.stdout = sys.stderr  # what peers print (sparsify at import) must not mix into the JSON
    torch.set_num_threads(threads)
    try:
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
        conn.send(("ready", (peak - probe.baseline, max(0, peak - before), first)))
    except Unavailable as err:
        conn.send(("skip", str(err)))
        return
    except Exception as err:  # reported as the contender's note instead of hanging the parent
        conn.send(("error", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"))
        return
    while conn.recv() == "run":
        seconds, result = timed(step, spec.device)
        conn.send((seconds, loss_value(result)))


class Worker(SpawnedWorker):
    """A contender in its own spawned process."""

    def __init__(self, case: Case, spec: Spec, warmup: int) -> None:
        super().__init__(_worker, (case, spec, warmup, torch.get_num_threads()))
        self.peak_mem, self.step_mem, self.loss_first = self.ready

    def run(self) -> tuple[float, float | None]:
        """(seconds, loss) of one step."""
        return self.request("run")


def _time_rounds(workers: dict[Case, Worker], rows: dict[Case, Row], steps: int) -> None:
    """``steps`` rounds of one step per worker, round-robin."""
    for _ in range(steps):
        for case, worker in workers.items():
            seconds, loss = worker.run()
            rows[case].times_s.append(seconds)
            rows[case].loss_last = loss


def measure(cases: list[Case], spec: Spec, steps: int, warmup: int, sequential: bool = False) -> list[Row]:
    """Build each case in its own process (one after another), then time ``steps`` rounds of
    one step per case, round-robin; medians per case. ``sequential``: build, time and close
    one case at a time, so only one contender's memory is held at once (timings then are
    not interleaved)."""
    rows = {case: Row(case.contender, case.setting) for case in cases}
    workers: dict[Case, Worker] = {}
    try:
        for case in cases:
            try:
                workers[case] = worker = Worker(case, spec, warmup)
            except (Unavailable, RuntimeError) as err:
                rows[case].note = str(err)
                continue
            rows[case].peak_mem_bytes, rows[case].step_mem_bytes = worker.peak_mem, worker.step_mem
            rows[case].loss_first = worker.loss_first
            if sequential:
                _time_rounds(workers, rows, steps)
                workers.pop(case).close()
        _time_rounds(workers, rows, steps)
    finally:
        for worker in workers.values():
            worker.close()
    for row in rows.values():
        if row.times_s:
            row.step_s = statistics.median(row.times_s)
            row.tokens_per_s = spec.batch / row.step_s
    gemm = next((r for r in rows.values() if r.contender == "gemm" and r.step_s), None)
    for row in rows.values():
        if row.step_s and gemm:
            row.over_gemm = row.step_s / gemm.step_s
    return list(rows.values())


# ---------------------------------------------------------------------------------------------
# Summary and output.
# ---------------------------------------------------------------------------------------------


def compare(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per peer: its fastest setting, and ours (the first optimizer) against it."""
    ours = next((r for r in rows if r.contender == "ours" and r.tokens_per_s), None)
    out: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        measured = [r for r in rows if r.contender == peer and r.tokens_per_s]
        if not measured:
            continue
        best = max(measured, key=lambda r: r.tokens_per_s)
        entry: dict[str, Any] = {"best": best.setting, "tokens_per_s": best.tokens_per_s,
                                 "peak_mem_mib": best.peak_mem_bytes / MIB}
        if ours:
            entry["speedup"] = ours.tokens_per_s / best.tokens_per_s
            entry["lower_peak_mem_than_every_setting"] = all(ours.peak_mem_bytes < r.peak_mem_bytes for r in measured)
            entry["mem_ratio_vs_best"] = ours.peak_mem_bytes / best.peak_mem_bytes
        out[peer] = entry
    return out


def machine_info(device: str) -> dict[str, Any]:
    """Date, hardware and versions to print beside the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    for package in ("torch", "jax", "eai-sparsify", "sae-lens"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            info[package] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def format_table(rows: list[Row], peers: dict[str, dict[str, Any]]) -> str:
    """The readable table and one comparison line per peer."""
    lines = [f"{'contender':<10} {'setting':<16} {'step ms':>9} {'tokens/s':>10} {'x GEMM':>7} "
             f"{'peak MiB':>9} {'step+ MiB':>9} {'loss first -> last':>20}  note"]
    for r in rows:
        loss = "-" if r.loss_first is None else f"{r.loss_first:.4g} -> {_fmt(r.loss_last, '.4g')}"
        lines.append(
            f"{r.contender:<10} {r.setting:<16} {_fmt(r.step_s, '9.1f', 1e3)} {_fmt(r.tokens_per_s, '10.0f')} "
            f"{_fmt(r.over_gemm, '7.2f')} {_fmt(r.peak_mem_bytes, '9.0f', 1 / MIB)} "
            f"{_fmt(r.step_mem_bytes, '9.0f', 1 / MIB)} {loss:>20}  {r.note}"
        )
    for peer, entry in peers.items():
        if "speedup" in entry:
            lines.append(f"ours vs {peer} (its faster setting: {entry['best']}): {entry['speedup']:.2f}x tokens/s, "
                         f"peak memory {entry['mem_ratio_vs_best']:.2f}x")
    return "\n".join(lines)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sae-engine bench train-step", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["torch", "jax"], default="torch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-in", type=int, default=320)
    parser.add_argument("--n-latents", type=int, default=10240)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--optimizer", default="adam",
                        help="adam, row_sparse_adam, or both comma-separated (the first is the headline)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per contender (interleaved)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--peers", default="sparsify,saelens", help="comma-separated peers, or 'none'")
    parser.add_argument("--sequential", action="store_true",
                        help="one contender in memory at a time (large n on small machines; not interleaved)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    args.optimizers = args.optimizer.split(",")
    args.peer_names = [] if args.peers == "none" else args.peers.split(",")
    for value, allowed, flag in ((args.optimizers, OPTIMIZERS, "--optimizer"), (args.peer_names, PEERS, "--peers")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    return args


def main(argv: list[str]) -> int:
    """Run the benchmark; print a table, or one JSON object with --json."""
    args = _parse(argv)
    reason = engine_available(args.backend)
    if reason:
        print(f"sae-engine bench train-step: error: {reason}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sae-engine bench train-step: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    spec = Spec(args.d_in, args.n_latents, args.k, args.batch, args.device, args.precision, args.backend)
    cases = [Case("ours", opt) for opt in args.optimizers] + [Case("gemm", str(spec.compute_dtype).removeprefix("torch."))]
    cases += [Case(peer, setting) for peer in args.peer_names for setting in PEER_SETTINGS[peer]]
    rows = measure(cases, spec, args.steps, args.warmup, args.sequential)
    peers = compare(rows)
    ours, gemm = rows[0], next(r for r in rows if r.contender == "gemm")
    if ours.step_s is None:
        print(f"sae-engine bench train-step: error: our step failed: {ours.note}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({
            "tokens_per_s": ours.tokens_per_s, "step_ms": ours.step_s * 1e3, "peak_mem_mib": ours.peak_mem_bytes / MIB,
            "gemm_ms": gemm.step_s and gemm.step_s * 1e3, "step_over_gemm": ours.over_gemm,
            "spec": asdict(spec), "optimizer": args.optimizers[0], "steps": args.steps, "warmup": args.warmup,
            "interleaved": not args.sequential,
            "machine": machine_info(args.device), "peers": peers, "rows": [asdict(r) for r in rows],
        }, indent=2))
        return 0
    info = machine_info(args.device)
    print(", ".join(f"{key}: {value}" for key, value in info.items() if value is not None))
    print(f"B={spec.batch} d={spec.d_in} n={spec.n_latents} k={spec.k} precision={spec.precision} "
          f"backend={spec.backend} device={spec.device}; medians of {args.steps} {'sequential' if args.sequential else 'interleaved'} steps after {args.warmup} warm-up")
    print(format_table(rows, peers))
    return 0
