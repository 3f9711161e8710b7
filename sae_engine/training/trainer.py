"""The training loop: data, schedule, logging, evaluation, checkpoints, signals.

The loop is backend-agnostic: a backend owns parameters, the step function and the optimizer
(``TorchSAE`` here); the loop owns everything else. It reads any activation source it is given
(:mod:`sae_engine.data.sources`); :func:`train` builds the one a config names through
:mod:`sae_engine.data.registry`, so this module knows no particular source. A run directory holds
``config.json``, ``metrics.jsonl``, ``curves.png`` and ``checkpoints/``. Starting a run whose
directory has a checkpoint resumes it (logged as "resuming from step N, checkpoint PATH"): on
the CPU the resumed run is bitwise identical to an uninterrupted one. Nothing here changes
process-wide settings (see :func:`sae_engine.memory.tune_allocator`: the CLI calls it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.folder import Resumable, newest_readable
from ..checkpoints.keys import RING_TENSORS
from ..checkpoints.lock import RunLock, RunLockedError
from ..checkpoints.meta import CheckpointError, read_meta
from ..config import ConfigError, RunConfig
from ..data.registry import build_source
from ..data.sources import ActivationSource, OffsetSource
from .backend import run_precision
from .metrics import JsonlLog, plot_curves
from .optim import learning_rate
from .placement import Placement, placement_for

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training stopped on bad data or a diverged loss; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    final: dict[str, float]
    interrupted: bool = False
    resumed_from: Path | None = None  # the checkpoint this run continued, if any


def _recorded_precision(checkpoint: Path | None) -> str | None:
    """The compute dtype a run's checkpoint says it started with (None without a checkpoint).
    Checkpoints from before ``precision_resolved`` computed in bf16 unless fp32 was asked for."""
    if checkpoint is None:
        return None
    train = read_meta(checkpoint)["config"]["train"]
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
    """Runs one training job from a RunConfig on an activation source; see the module docstring.

    ``source`` yields vectors ``[d_in]`` (an SAE) or ``[d_in + d_out]``, input and target side by
    side (a transcoder); its first ``data.eval_tokens`` vectors are held out for evaluation.
    ``placement``: where the run trains (default: the one ``[parallel]`` asks for).
    """

    def __init__(self, config: RunConfig, source: ActivationSource, placement: Placement | None = None) -> None:
        self.run_dir = Path(config.train.out_dir)
        self.placement = placement_for(config) if placement is None else placement
        self.is_main = self.placement.is_main
        self._held = self._hold()
        try:
            self._setup(config, source)
        except BaseException:
            self.release()
            raise

    def _hold(self) -> contextlib.ExitStack:
        """Hold the run folder for this run (``RunLock``) before anything else: a second run on
        it stops here, having done and written nothing."""
        held = contextlib.ExitStack()
        refusal = None
        if self.is_main:
            try:
                held.enter_context(RunLock(self.run_dir))
            except RunLockedError as error:
                refusal = error
        if self.placement.any(refusal is not None):
            raise refusal or RunLockedError(f"{self.run_dir} is in use by another training run (see rank 0)")
        return held

    def _setup(self, config: RunConfig, source: ActivationSource) -> None:
        width = config.model.d_in + (config.model.d_out or 0)
        if source.d != width:
            raise ConfigError(f"the data source gives vectors of d={source.d}, but the model needs d={width}"
                              + (" (model.d_in + model.d_out)" if config.model.is_transcoder else " (model.d_in)"))
        d = config.data
        if len(source) <= d.eval_tokens:
            raise ConfigError(f"the data holds {len(source)} vectors, not more than data.eval_tokens = {d.eval_tokens}")
        self.eval_batch = _read_head(source, d.eval_tokens) if d.eval_tokens else None
        self.train_source = OffsetSource(source, d.eval_tokens)
        self.found = newest_readable(self.run_dir)  # what run() resumes from (None: a fresh run)
        precision = run_precision(config.train, self.placement.compute_device_type, _recorded_precision(self.found.path))
        # The config as recorded in config.json and every checkpoint: with the dtype this run computes in.
        self.config = dataclasses.replace(config, train=dataclasses.replace(config.train, precision_resolved=precision.dtype))
        if self.is_main:
            log.info("computing in %s (%s)", precision.dtype, precision.reason)
        dtype = torch.bfloat16 if precision.dtype == "bf16" else torch.float32
        self.buffer = self.placement.feed(self.train_source, d.buffer_size, dtype, d.seed)
        available = len(self.train_source)
        budget = min(config.train.max_tokens or available, available)
        self.total_steps = budget // config.train.batch_size
        if self.total_steps < 1:
            raise ConfigError(f"{budget} training vectors make no full batch of train.batch_size = {config.train.batch_size}")
        self.backend = self.placement.backend(self.config, precision.dtype)
        self.log = JsonlLog(self.run_dir / "metrics.jsonl")
        self.step = 0
        self.resumed_from: Path | None = None

    # -- state ---------------------------------------------------------------------------------

    def _meta(self) -> tuple[dict[str, Any], dict[str, Any]]:
        buffer_state = self.buffer.state_dict()
        return {
            "config": self.config.to_dict(),
            "step": self.step,
            "tokens": self.step * self.config.train.batch_size,
            "adam_count": self.backend.adam_count,
            "aux_active": self.backend.aux_active,
            "buffer": {key: value for key, value in buffer_state.items() if key not in RING_TENSORS},
        }, buffer_state

    def save(self) -> Path:
        """Checkpoint this step; CheckpointWriteError (the previous checkpoint kept) when it cannot."""
        meta, buffer_state = self._meta()
        ring = {f"buffer.{key}": buffer_state[key] for key in RING_TENSORS if key in buffer_state}
        if "buffer.unserved" in ring:
            ring["buffer.unserved"] = ring["buffer.unserved"].float()
        return self.placement.save(self.run_dir, self.step, self.backend, ring, meta, self.config.train.keep_checkpoints)

    def _resume(self, found: Resumable) -> None:
        """Continue from the newest checkpoint that reads back, passing over (and naming) broken ones."""
        while found.path is not None:
            path = found.path
            meta = read_meta(path)
            # Read through the config class, so keys added since the checkpoint take their defaults.
            stored = RunConfig.from_dict(meta["config"], origin=f"{path / 'meta.json'}").to_dict()["model"]
            if stored != self.config.to_dict()["model"]:
                raise ConfigError(f"{path}: the checkpoint's [model] differs from this config; "
                                  "use another train.out_dir or the same model settings")
            imported = "imported_from" in meta  # `sae-engine import`: weights only, fresh optimizer, data from the start
            counters = (0, False) if imported else (meta["adam_count"], meta["aux_active"])
            try:
                ring, failure = self.placement.restore(path, self.backend, self.config, *counters), None
            except CheckpointError as error:
                ring, failure = {}, str(error)
            if self.placement.any(failure is not None):  # every rank moves on to the same checkpoint
                found = newest_readable(self.run_dir, found.skipped + [(path, failure or "unreadable on another rank")])
                continue
            break
        for broken, why in found.skipped if self.is_main else []:
            log.warning("checkpoint %s cannot be read (%s); passed over", broken, why)
        if found.path is None:
            names = ", ".join(str(broken) for broken, _ in found.skipped)
            raise CheckpointError(f"{self.run_dir} holds checkpoints but none can be read ({names}); move them "
                                  "away to start afresh, or use another train.out_dir")
        if imported:
            log.warning(
                "continuing training from weights imported from %s (%s); the optimizer state starts fresh",
                meta["imported_from"]["path"], meta["imported_from"]["format"])
            return
        self.buffer.load_state_dict({**meta["buffer"], **{key: ring[f"buffer.{key}"] for key in RING_TENSORS
                                                          if f"buffer.{key}" in ring}})
        self.step = meta["step"]
        if self.is_main:
            self.log.truncate_after(self.step)
            log.info("resuming from step %d, checkpoint %s", self.step, path)
        self.resumed_from = path

    def _initialize(self) -> None:
        sample = self.eval_batch if self.eval_batch is not None else next(self.train_source.iter_from(0))
        x, y = _split(sample[:4096].float(), self.config.model.d_in)
        self.backend.initialize(x, y)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the end or a signal; the run folder is released after."""
        try:
            return self._train()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the run folder (``run`` does so itself; for a Trainer that is not run)."""
        self._held.close()

    def _train(self) -> TrainResult:
        t = self.config.train
        if self.found.path is not None or self.found.skipped:
            self._resume(self.found)
        else:
            self._initialize()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(self.config.to_json())
        lr_peak = self.config.learning_rate
        progress = _progress(self.total_steps, self.step, t.progress and self.is_main)
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
                if self.placement.any(stop.signal is not None):
                    interrupted = True
                    break
        progress.close()
        self.save()
        if self.is_main:
            plot_curves(self.log.read(), self.run_dir / "curves.png")
        return TrainResult(self.run_dir, self.step, self.step * t.batch_size, last, interrupted, self.resumed_from)

    def _log(self, metrics: dict[str, torch.Tensor], lr: float, steps: int, elapsed: float) -> dict[str, float]:
        t = self.config.train
        record: dict[str, float] = {"step": self.step, "tokens": self.step * t.batch_size, "lr": lr}
        record.update({name: float(value) for name, value in metrics.items()})
        record.update(self.backend.latent_stats(steps * t.batch_size))
        record["tokens_per_s"] = steps * t.batch_size / max(elapsed, 1e-9)
        if self.is_main:
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
        if self.is_main:
            self.log.write({"step": self.step, "tokens": self.step * self.config.train.batch_size, **record})
        return record


def _progress(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def train(config: RunConfig, source: ActivationSource | None = None) -> TrainResult:
    """Train (or resume) the run a config describes, on ``source`` or else the source that
    ``config.data`` names (built through :mod:`sae_engine.data.registry`), placed as
    ``[parallel]`` asks (``training.placement.placement_for``). See ``Trainer``."""
    placement = placement_for(config)
    return Trainer(config, source if source is not None else build_source(config), placement).run()

