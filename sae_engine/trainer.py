"""The training loop: data, schedule, logging, evaluation, checkpoints, signals.

The loop is backend-agnostic: a backend owns parameters, the step function and the optimizer
(``TorchSAE`` here); the loop owns everything else. A run directory holds ``config.json``,
``metrics.jsonl``, ``curves.png`` and ``checkpoints/``. Starting a run whose directory has a
checkpoint resumes it: on the CPU the resumed run is bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import itertools
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backend import SAEBackend, run_precision
from .buffer import RingBuffer
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, RunConfig
from .memory import tune_allocator
from .metrics import JsonlLog, plot_curves
from .optim import learning_rate
from .sources import ActivationSource, ShardSource, SyntheticSource


class TrainingError(RuntimeError):
    """Training stopped on bad data or a diverged loss; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final: dict[str, float]
    interrupted: bool = False


class OffsetSource:
    """A view of a source that starts ``offset`` vectors in (the rest is the held-out set)."""

    def __init__(self, inner: ActivationSource, offset: int) -> None:
        self.inner, self.offset, self.d = inner, offset, inner.d

    def __len__(self) -> int:
        return len(self.inner) - self.offset

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        return self.inner.iter_from(start + self.offset)


class PairedSource:
    """Input and target sources read side by side as [m, d_in + d_out] chunks (transcoders)."""

    def __init__(self, inputs: ActivationSource, targets: ActivationSource) -> None:
        if len(inputs) != len(targets):
            raise ConfigError(f"transcoder inputs hold {len(inputs)} vectors but targets hold {len(targets)}")
        self.inputs, self.targets = inputs, targets
        self.d = inputs.d + targets.d

    def __len__(self) -> int:
        return len(self.inputs)

    def iter_from(self, start: int) -> Iterator[torch.Tensor]:
        for x, y in zip(self.inputs.iter_from(start), self.targets.iter_from(start)):
            yield torch.cat([x.float(), y.float()], dim=1)


def build_source(config: RunConfig) -> ActivationSource:
    """The activation source a config names: vectors [d_in] (SAE) or [d_in + d_out] (transcoder)."""
    m, d = config.model, config.data
    width = m.d_in + (m.d_out or 0)
    if d.source == "synthetic":
        return SyntheticSource(width, d.synthetic_tokens + d.eval_tokens, seed=d.seed)
    if d.source == "shards":
        inputs = ShardSource(d.paths)
        if inputs.d != m.d_in:
            raise ConfigError(f"data.paths: shards have d={inputs.d} but model.d_in = {m.d_in}")
        if not m.is_transcoder:
            return inputs
        targets = ShardSource(d.target_paths)
        if targets.d != m.d_out:
            raise ConfigError(f"data.target_paths: shards have d={targets.d} but model.d_out = {m.d_out}")
        return PairedSource(inputs, targets)
    layers = [d.layer] + ([d.target_layer] if m.is_transcoder else [])
    if d.source == "esm_live":
        return _live_source(config, layers)
    from .esm.extract import StoreSource, ensure_store

    ensure_store(d.store, layers=layers, fasta=_fasta_subset(config), model=d.esm_model, pool=d.pool,
                 progress=config.train.progress)
    inputs = StoreSource(d.store, d.layer)
    if inputs.d != m.d_in:
        raise ConfigError(f"data.store: layer {d.layer} vectors have d={inputs.d} but model.d_in = {m.d_in}")
    if not m.is_transcoder:
        return inputs
    targets = StoreSource(d.store, d.target_layer)
    if targets.d != m.d_out:
        raise ConfigError(f"data.store: layer {d.target_layer} vectors have d={targets.d} but model.d_out = {m.d_out}")
    return PairedSource(inputs, targets)


def _live_source(config: RunConfig, layers: list[int]) -> ActivationSource:
    """ESM2 run by the ring buffer's producer (see sae_engine.esm.live)."""
    from .esm.live import LiveSource
    from .esm.models import load_model

    m = config.model
    source = LiveSource(_fasta_subset(config), load_model(config.data.esm_model), layers, pool=config.data.pool)
    width = source.d // len(layers)
    if width != m.d_in or (m.is_transcoder and width != m.d_out):
        raise ConfigError(f"data.esm_model gives d={width} vectors but model.d_in = {m.d_in}"
                          + (f", model.d_out = {m.d_out}" if m.is_transcoder else ""))
    return source


def _fasta_subset(config: RunConfig) -> Path | None:
    """The FASTA to extract from: data.fasta, or its first data.max_proteins records."""
    d = config.data
    if not d.fasta:
        return None
    fasta = Path(d.fasta).expanduser()
    if d.max_proteins is None:
        return fasta
    from .esm.fasta import read_fasta, write_fasta

    subset = Path(d.store or config.train.out_dir).expanduser().with_suffix(".input.fasta")
    if not subset.exists():
        subset.parent.mkdir(parents=True, exist_ok=True)
        tmp = subset.with_name(subset.name + ".tmp")
        write_fasta(itertools.islice(read_fasta(fasta), d.max_proteins), tmp)
        tmp.rename(subset)
    return subset


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def make_backend(config: RunConfig, device: torch.device, precision: str | None = None) -> SAEBackend:
    """The backend ``train.backend`` names, computing in ``precision`` ("bf16" or "fp32"; None =
    ``train.precision`` decided for the device)."""
    if device.type == "cpu":
        # A step frees and reallocates tens of MiB: keep that memory instead of faulting it in again.
        tune_allocator()
    if config.train.backend == "torch":
        from .torch_backend import TorchSAE

        return TorchSAE(config, device, precision)
    if device.type != "cpu":
        raise ConfigError("train.backend = 'jax' runs where JAX runs; use train.device = 'cpu' here, "
                          "or a JAX build with GPU support and the default device")
    from .jax_backend import JaxSAE

    return JaxSAE(config, precision)


def _recorded_precision(checkpoint: Path | None) -> str | None:
    """The compute dtype a run's checkpoint says it started with (None without a checkpoint).
    Checkpoints from before ``precision_resolved`` computed in bf16 unless fp32 was asked for."""
    if checkpoint is None:
        return None
    train = json.loads((checkpoint / "meta.json").read_text())["config"]["train"]
    return train.get("precision_resolved") or ("fp32" if train["precision"] == "fp32" else "bf16")


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _read_head(source: ActivationSource, count: int) -> torch.Tensor:
    """The first ``count`` vectors of a source. -> [count, d]."""
    chunks, held = [], 0
    for chunk in itertools.takewhile(lambda _: held < count, source.iter_from(0)):
        chunks.append(chunk[: count - held])
        held += len(chunks[-1])
    return torch.cat(chunks).float()


def _split(batch: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer batch as (input, target): the same tensor for SAEs, halves for transcoders."""
    if batch.shape[1] == d_in:
        return batch, batch
    return batch[:, :d_in], batch[:, d_in:]


def _check_finite(step: int, batch: torch.Tensor, metrics: dict) -> None:
    loss = float(metrics["loss"])  # one host sync a step; metrics may be torch or JAX scalars
    if math.isfinite(loss):
        return
    bad = (~torch.isfinite(batch)).sum().item()
    if bad:
        raise TrainingError(f"step {step}: the activation batch holds {bad} NaN/Inf values; stopped, "
                            "the last checkpoint is kept")
    raise TrainingError(f"step {step}: the loss became {loss} (diverged); stopped, "
                        "the last checkpoint is kept; try a lower train.lr")


class Trainer:
    """Runs one training job from a RunConfig; see the module docstring."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.run_dir = Path(config.train.out_dir)
        self.device = resolve_device(config.train.device)
        source = build_source(config)
        d = config.data
        if len(source) <= d.eval_tokens:
            raise ConfigError(f"the data holds {len(source)} vectors, not more than data.eval_tokens = {d.eval_tokens}")
        self.eval_batch = _read_head(source, d.eval_tokens) if d.eval_tokens else None
        self.train_source = OffsetSource(source, d.eval_tokens)
        precision = run_precision(config.train, self.device.type, _recorded_precision(latest_checkpoint(self.run_dir)))
        config.train.precision_resolved = precision.dtype  # recorded in config.json and every checkpoint
        print(f"sae-engine train: computing in {precision.dtype} ({precision.reason})", file=sys.stderr)
        dtype = torch.bfloat16 if precision.dtype == "bf16" else torch.float32
        self.buffer = RingBuffer(self.train_source, d.buffer_size, dtype=dtype, device=self.device, seed=d.seed)
        available = len(self.train_source)
        budget = min(config.train.max_tokens or available, available)
        self.total_steps = budget // config.train.batch_size
        if self.total_steps < 1:
            raise ConfigError(f"{budget} training vectors make no full batch of train.batch_size = {config.train.batch_size}")
        self.backend = make_backend(config, self.device, precision.dtype)
        self.log = JsonlLog(self.run_dir / "metrics.jsonl")
        self.step = 0

    # -- state ---------------------------------------------------------------------------------

    def _meta(self) -> dict[str, Any]:
        buffer_state = self.buffer.state_dict()
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "tokens": self.step * self.config.train.batch_size,
            "adam_count": self.backend.adam_count,
            "aux_active": self.backend.aux_active,
            "buffer": {key: value for key, value in buffer_state.items() if key not in ("unserved", "rng")},
        }, buffer_state

    def save(self) -> Path:
        meta, buffer_state = self._meta()
        tensors = dict(self.backend.state_tensors())
        tensors["buffer.unserved"] = buffer_state["unserved"].float()
        tensors["buffer.rng"] = buffer_state["rng"]
        return save_checkpoint(self.run_dir, self.step, tensors, meta, keep=self.config.train.keep_checkpoints)

    def _resume(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        if meta["config"]["model"] != self.config.to_dict()["model"]:
            raise ConfigError(f"{path}: the checkpoint's [model] differs from this config; "
                              "use another train.out_dir or the same model settings")
        self.backend.load_state_tensors(tensors, meta["adam_count"], meta["aux_active"])
        self.buffer.load_state_dict({**meta["buffer"], "unserved": tensors["buffer.unserved"], "rng": tensors["buffer.rng"]})
        self.step = meta["step"]
        self.log.truncate_after(self.step)

    def _initialize(self) -> None:
        sample = self.eval_batch if self.eval_batch is not None else next(self.train_source.iter_from(0))
        x, y = _split(sample[:4096].float(), self.config.model.d_in)
        self.backend.initialize(x, y)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t = self.config.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(self.config.to_json())
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            self._resume(checkpoint)
        else:
            self._initialize()
        lr_peak = self.config.learning_rate
        progress = _progress(self.total_steps, self.step, t.progress)
        window_start, window_steps = time.perf_counter(), 0
        last: dict[str, float] = {}
        interrupted = False
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                batch = self.buffer.next_batch(t.batch_size, drop_last=True)
                if batch is None:
                    break
                x, y = _split(batch, self.config.model.d_in)
                lr = learning_rate(self.step, self.total_steps, lr_peak, t.warmup_steps, t.decay, t.decay_start)
                metrics = self.backend.train_step(x, y, lr)
                _check_finite(self.step, batch, metrics)
                self.step += 1
                window_steps += 1
                progress.update(1)
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - window_start
                    last = self._log(metrics, lr, window_steps, elapsed)
                    progress.set_postfix(fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}", dead=f"{last['dead_fraction']:.3f}")
                    window_start, window_steps = time.perf_counter(), 0
                if self.eval_batch is not None and (self.step % t.eval_every == 0 or self.step == self.total_steps):
                    last.update(self._evaluate())
                if self.step % t.checkpoint_every == 0:
                    self.save()
                if stop.signal is not None:
                    interrupted = True
                    break
        progress.close()
        self.save()
        plot_curves(self.log.read(), self.run_dir / "curves.png")
        return TrainResult(self.run_dir, self.step, self.step * t.batch_size, last, interrupted)

    def _log(self, metrics: dict[str, torch.Tensor], lr: float, steps: int, elapsed: float) -> dict[str, float]:
        t = self.config.train
        record: dict[str, float] = {"step": self.step, "tokens": self.step * t.batch_size, "lr": lr}
        record.update({name: float(value) for name, value in metrics.items()})
        record.update(self.backend.latent_stats(steps * t.batch_size))
        record["tokens_per_s"] = steps * t.batch_size / max(elapsed, 1e-9)
        self.log.write(record)
        return record

    def _evaluate(self) -> dict[str, float]:
        x, y = _split(self.eval_batch, self.config.model.d_in)
        results: dict[str, list[float]] = {}
        for lo in range(0, x.shape[0], self.config.train.batch_size):
            hi = lo + self.config.train.batch_size
            for key, value in self.backend.evaluate(x[lo:hi], y[lo:hi]).items():
                results.setdefault(key, []).append(value)
        record = {key: float(sum(v) / len(v)) for key, v in results.items()}
        self.log.write({"step": self.step, "tokens": self.step * self.config.train.batch_size, **record})
        return record


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(config: RunConfig) -> TrainResult:
    """Train (or resume) the run a config describes. See ``Trainer``."""
    return Trainer(config).run()

