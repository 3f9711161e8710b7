"""Sharded runs end to end: torchrun, resume across meshes, kill -9, export, and clear errors.

Tolerance of the cross-mesh comparisons: as in test_parallel_train (fp32 sums in other
orders, about 1e-7 relative a step; rtol 1e-4, atol 1e-5 after 24 steps). A run resumed
after kill -9 on the same mesh repeats the same operations: bitwise equal.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from kill import die_before_step
from safetensors import safe_open
from safetensors.torch import load_file

from sae_engine.checkpoints import latest_checkpoint
from sae_engine.cli import main as cli_main
from sae_engine.config import ConfigError, load_config
from sae_engine.checkpoints.dcp import load_rows
from sae_engine.parallel.launch import run_local
from sae_engine.training.torch_backend import TorchSAE
from sae_engine.data.registry import build_source
from sae_engine.training.trained import load_trained_sae
from sae_engine.training.trainer import Trainer

BATCH = 32
BASE = ["model.d_in=16", "model.n_latents=45", "model.k=4", "model.dead_tokens=64", "model.k_aux=8",
        "data.synthetic.tokens=2048", "data.buffer_size=256", "data.eval_tokens=64", f"train.batch_size={BATCH}",
        "train.progress=false", "train.checkpoint_every=3", "train.log_every=3", "train.eval_every=6",
        "train.precision='fp32'", "train.lr=1e-3", "train.warmup_steps=0", "train.device='cpu'"]
TOL = dict(rtol=1e-4, atol=1e-5)


def _overrides(out_dir: Path, steps: int, latent: int = 1, data: int = 1) -> list[str]:
    return BASE + [f"train.out_dir='{out_dir}'", f"train.max_tokens={steps * BATCH}",
                   f"parallel.latent={latent}", f"parallel.data={data}"]


def _train(overrides: list[str], kill_at: int | None = None) -> int:
    """One rank's run; with kill_at, global rank 1 sends itself SIGKILL before that step."""
    config = load_config(None, overrides)
    trainer = Trainer(config, build_source(config))
    if kill_at is not None and int(os.environ.get("RANK", 0)) == 1:
        die_before_step(trainer, kill_at)
    result = trainer.run()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result.step


def _train_each(*runs: list[str]) -> list[int]:
    """Several runs one after the other in the same processes (one process group)."""
    steps = []
    for overrides in runs:
        config = load_config(None, overrides)
        steps.append(Trainer(config, build_source(config)).run().step)
    dist.destroy_process_group()
    return steps


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's latest state tensors, whole, read in this one process (any checkpoint format)."""
    config = load_config(None, BASE)
    like = TorchSAE(config, torch.device("cpu")).state_tensors()
    return load_rows(latest_checkpoint(run_dir), like, config.model.n_latents, None)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "sae_engine", "train", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=180)


def test_resume_across_meshes_then_export_equals_one_process(tmp_path):
    run = tmp_path / "run"
    # 1x2 under torchrun itself (its own rendezvous), 6 steps.
    sets = [f"--set={item}" for item in _overrides(run, 6, latent=2)]
    done = _torchrun(sets, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((latest_checkpoint(run) / "meta.json").read_text())["mesh"] == {"data": 1, "latent": 2}
    assert run_local(_train, 4, _overrides(run, 12, latent=4), timeout=180) == [12] * 4  # latent 2 -> 4
    assert _train(_overrides(run, 18)) == 18  # sharded -> one process
    assert run_local(_train, 4, _overrides(run, 24, latent=2, data=2), timeout=180) == [24] * 4  # one -> 2x2

    single = tmp_path / "single"
    assert _train(_overrides(single, 24)) == 24
    got, want = _state(run), _state(single)
    for key, value in want.items():
        if key.startswith(("buffer.since_fired", "buffer.fire_count", "buffer.unserved", "buffer.rng")):
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, **TOL, msg=key)

    # `sae-engine export` streams the sharded run into one file like a single-process run's.
    assert cli_main(["export", str(run), "--out", str(tmp_path / "sae.safetensors")]) == 0
    assert cli_main(["export", str(single), "--out", str(tmp_path / "single.safetensors")]) == 0
    exported, model = load_file(tmp_path / "sae.safetensors"), load_file(tmp_path / "single.safetensors")
    assert sorted(exported) == sorted(model)
    for key, value in model.items():
        torch.testing.assert_close(exported[key], value, **TOL, msg=key)
    with safe_open(str(tmp_path / "sae.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["config"])["parallel"] == {"data": 2, "latent": 2}
        assert handle.metadata()["step"] == "24"
    # Analysis loads the sharded run whole.
    analysed = load_trained_sae(run)
    torch.testing.assert_close(analysed.params["W_dec"], want["param.W_dec"], **TOL)


def test_kill_one_rank_then_resume_is_exact(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    with pytest.raises(Exception, match="signal|SIGKILL|exit"):
        run_local(_train, 2, _overrides(killed, 10, latent=2), 8, timeout=120)
    assert json.loads((latest_checkpoint(killed) / "meta.json").read_text())["step"] == 6
    resumed_and_clean = run_local(_train_each, 2, _overrides(killed, 10, latent=2), _overrides(clean, 10, latent=2),
                                  timeout=120)
    assert resumed_and_clean == [[10, 10], [10, 10]]
    got, want = _state(killed), _state(clean)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_bad_meshes_are_clear_errors_and_write_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="needs 2 processes: start it with torchrun"):
        _train(_overrides(out, 4, latent=2))
    with pytest.raises(ConfigError, match=r"parallel.latent = 46: cannot split 45 latents"):
        load_config(None, _overrides(out, 4, latent=46))
    with pytest.raises(ConfigError, match="does not split over parallel.data = 3"):
        _train(_overrides(out, 4, data=3))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="= 2 ranks, but torchrun started WORLD_SIZE = 3"):
        _train(_overrides(out, 4, latent=2))
    assert not out.exists()


def test_checkpoint_of_another_model_shape_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    assert _train(_overrides(out, 2)) == 2
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(ConfigError, match="the checkpoint's \\[model\\] differs"):
        _train(_overrides(out, 4) + ["model.n_latents=50"])
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written
