"""JAX mesh training equals one device: the backend over 4 meshes, runs resumed across meshes
(orbax checkpoints), kill -9 then resume, export, and clear errors.

Each case runs this file as a script in a fresh process with 4 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4). Tolerance: fp32, rtol 1e-4 / atol 1e-5 on
weights and Adam moments, as for the torch meshes (test_parallel_train): XLA blocks a shard's
GEMMs by its shape and adds the mesh's partial sums in another order, about 1e-7 relative a step,
and Adam's bounded steps keep 20-24 steps within a few 1e-6. Selections, and so the firing
statistics, are compared exactly. A run resumed after kill -9 on the same mesh repeats the same
operations: bitwise equal.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("orbax.checkpoint")

BATCH = 32
BASE = ["model.d_in=16", "model.n_latents=45", "model.k=4", "model.dead_tokens=64", "model.k_aux=8",
        "data.synthetic.tokens=2048", "data.buffer_size=256", "data.eval_tokens=64", f"train.batch_size={BATCH}",
        "train.progress=false", "train.checkpoint_every=3", "train.log_every=3", "train.eval_every=6",
        "train.precision='fp32'", "train.lr=1e-3", "train.warmup_steps=0", "train.device='cpu'",
        "train.backend='jax'"]
TOL = dict(rtol=1e-4, atol=1e-5)
EXACT = ("buffer.since_fired", "buffer.fire_count", "buffer.unserved", "buffer.rng")


def _run_script(*args: str, devices: int = 4, expect_kill: bool = False) -> str:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=400)
    if expect_kill:
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    else:
        assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_jax_meshes_train_as_one_device():
    assert _run_script("backend").strip().endswith("ok")


def test_collectives_are_read_from_hlo_with_their_groups():
    from sae_engine.benchmarks.jax_mesh import collectives

    hlo = """
      %a = f32[256,32]{0,1} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={1}
      %b = (f32[1024,64]{1,0}, f32[1024]{0}) all-reduce(%y, %z), replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}
      %c = f32[64,8]{0,1} reduce-scatter(%w), replica_groups=[2,2]<=[4], dimensions={1}
      %d = f32[64,64]{1,0} all-reduce(%v), replica_groups={{0},{1},{2},{3}}
      %e = f32[64,64]{1,0} add(%v, %v)
    """
    found = collectives(hlo)
    assert [(c["kind"], c["group"], c["bytes"]) for c in found] == [
        ("all-gather", 4, 256 * 32 * 4), ("all-reduce", 2, (1024 * 64 + 1024) * 4), ("reduce-scatter", 2, 64 * 8 * 4),
        ("all-reduce", 1, 64 * 64 * 4)]
    assert [c["sent"] for c in found] == [3 / 4 * 256 * 32 * 4, (1024 * 64 + 1024) * 4, 64 * 8 * 4, 0]


def test_jax_resume_across_meshes_then_export_equals_one_device(tmp_path):
    assert _run_script("resume", str(tmp_path)).strip().endswith("ok")


def test_jax_kill_then_resume_is_exact(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    _run_script("train", str(killed), "10", "2", "2", "8", expect_kill=True)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_000000006"
    _run_script("train", str(killed), "10", "2", "2")
    _run_script("train", str(clean), "10", "2", "2")
    assert _run_script("equal", str(killed), str(clean), "exact").strip().endswith("ok")


def test_jax_mesh_errors_are_clear_and_write_nothing(tmp_path):
    assert _run_script("errors", str(tmp_path), devices=2).strip().endswith("ok")
    assert not (tmp_path / "run").exists()


def test_cli_asks_xla_for_the_mesh_host_devices(tmp_path):
    """`sae-engine train` of a JAX mesh on the CPU starts without XLA_FLAGS: the CLI sets them."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    sets = [f"--set={item}" for item in _overrides(tmp_path / "run", 2, latent=2)]
    done = subprocess.run([sys.executable, "-m", "sae_engine", "train", *sets], env={**env, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "done: step 2" in done.stdout
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_000000002" / "meta.json").read_text())["mesh"] == \
        {"data": 1, "latent": 2}


# -- the cases, run in a process with host devices ------------------------------------------------

def _overrides(out_dir: Path, steps: int, data: int = 1, latent: int = 1, backend: str = "jax") -> list[str]:
    return BASE + [f"train.out_dir='{out_dir}'", f"train.max_tokens={steps * BATCH}", f"parallel.data={data}",
                   f"parallel.latent={latent}", f"train.backend='{backend}'"]


def _train(overrides: list[str], kill_at: int | None = None) -> int:
    from sae_engine.config import load_config
    from sae_engine.data.registry import build_source
    from sae_engine.training.trainer import Trainer

    config = load_config(None, overrides)
    trainer = Trainer(config, build_source(config))
    if kill_at is not None:
        from kill import die_before_step

        die_before_step(trainer, kill_at)
    return trainer.run().step


def _state(run_dir: Path):
    """A run's latest state tensors, whole, as one process reads them (any checkpoint layout)."""
    import torch

    from sae_engine.checkpoints import latest_checkpoint, layout_of, load_checkpoint
    from sae_engine.checkpoints.dcp import load_rows
    from sae_engine.checkpoints.orbax import read_ring, read_tensors
    from sae_engine.config import load_config
    from sae_engine.training.torch_backend import TorchSAE

    path = latest_checkpoint(run_dir)
    if layout_of(path) == "orbax":
        state = {**read_tensors(path), **read_ring(path)}
    elif layout_of(path) == "dcp":
        like = TorchSAE(load_config(None, BASE), torch.device("cpu")).state_tensors()
        state = load_rows(path, like, 45, None, ("buffer.unserved", "buffer.unserved_positions", "buffer.rng"))
    else:
        state = load_checkpoint(path)[0]
    # The firing statistics' last slot absorbs empty code slots; each torch rank keeps its own.
    return {key: value[:-1] if key.startswith(("buffer.since_fired", "buffer.fire_count")) else value
            for key, value in state.items()}


def _assert_equal(got: dict, want: dict, exact: bool) -> None:
    import torch

    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key, value in want.items():
        if exact or key.startswith(EXACT):
            assert torch.equal(got[key], value), key
        else:
            torch.testing.assert_close(got[key], value, **TOL, msg=key)


def _case_backend() -> None:
    """20 steps at 1x2, 2x1, 2x2, 1x4 (TopK + Multi-TopK + AuxK, BatchTopK, a transcoder) equal
    one device on the same global batches."""
    import torch

    from sae_engine.config import RunConfig

    sys.path.insert(0, str(Path(__file__).parent))
    from test_parallel_train import LR, _batches, _configs

    from sae_engine.training.backend import ArrayBackend
    from sae_engine.training.jax_backend import JaxSAE
    from sae_engine.parallel.jax_mesh import build_jax_mesh, sharded_jax_backend

    def train(sae, config):
        d_in = config.model.d_in
        batches = _batches(config)
        sample = batches[0]
        sae.initialize(sample[:, :d_in], sample[:, d_in:] if config.model.is_transcoder else sample)
        for step, batch in enumerate(batches):
            sae.train_step(batch[:, :d_in], batch[:, d_in:] if config.model.is_transcoder else batch, LR)
            if (step + 1) % 5 == 0:
                sae.latent_stats(5 * batch.shape[0])
        return sae.state_tensors()

    # "wide": n >> B k, where data ranks sum touched rows of W (not dense gradients).
    wide = RunConfig.from_dict({"model": {"d_in": 16, "n_latents": 4096, "k": 4}, "data": {"synthetic": {"tokens": 4096}},
                                "train": {"batch_size": 32, "lr": LR, "warmup_steps": 0, "precision": "fp32"}})
    meshes = {"wide": ((2, 1), (2, 2))}
    for name, config in {**_configs(), "wide": wide}.items():
        want = train(JaxSAE(config, "fp32"), config)
        for data, latent in meshes.get(name, ((1, 2), (2, 1), (2, 2), (1, 4))):
            sae = sharded_jax_backend(config, build_jax_mesh(data, latent), "fp32")
            assert isinstance(sae, ArrayBackend)
            got = train(sae, config)
            # Per-latent state stays split: each device holds ceil(n / L) rows.
            shards = sae.state["W_enc"][...].addressable_shards
            assert {s.data.shape[0] for s in shards} == {-(-config.model.n_latents // latent)}, name
            _assert_equal(got, want, exact=False)
        print(name, "equal on every mesh")

    # No collective moves W: at 1x4 every one is far smaller than a device's rows of W_enc; at
    # 2x2 the largest is the data ranks' gather of the W rows each touched (B/D k of them).
    from sae_engine.benchmarks.jax_mesh import BATCH, SHAPE, step_collectives

    config = RunConfig.from_dict({"model": SHAPE, "train": {"batch_size": BATCH, "precision": "fp32", "device": "cpu"}})
    n, d = SHAPE["n_latents"], SHAPE["d_in"]
    for data, latent in ((1, 4), (2, 2)):
        sae = sharded_jax_backend(config, build_jax_mesh(data, latent), "fp32")
        found = [c for c in step_collectives(sae, sae._in(torch.randn(BATCH, d))) if c["group"] > 1]
        shard = n // latent * d * 4
        if data == 1:
            assert max(c["bytes"] for c in found) < shard / 4, found
        else:
            largest = max(found, key=lambda c: c["bytes"])
            touched = BATCH // data * SHAPE["k"]
            assert largest["kind"] == "all-gather" and largest["group"] == data, largest
            assert largest["bytes"] == data * touched * d * 4, largest
            assert largest["sent"] < 2 * (data - 1) / data * shard / 1.9, largest  # half the dense sum's bytes


def _case_resume(tmp: Path) -> None:
    """1x2 -> 1x4 -> one device -> 2x2 (orbax checkpoints resharded on each resume) equals one
    device throughout; export streams one file equal to the one device run's; a torch process
    resumes the orbax checkpoint."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sae_engine.cli import main as cli_main
    from sae_engine.training.trained import load_trained_sae

    run, single = tmp / "run", tmp / "single"
    assert _train(_overrides(run, 6, latent=2)) == 6
    assert json.loads((run / "checkpoints" / "step_000000006" / "meta.json").read_text())["mesh"] == {"data": 1, "latent": 2}
    assert _train(_overrides(run, 12, latent=4)) == 12
    assert _train(_overrides(run, 18)) == 18
    assert _train(_overrides(run, 24, data=2, latent=2)) == 24
    assert _train(_overrides(single, 24)) == 24
    _assert_equal(_state(run), _state(single), exact=False)

    assert cli_main(["export", str(run), "--out", str(tmp / "sae.safetensors")]) == 0
    assert cli_main(["export", str(single), "--out", str(tmp / "single.safetensors")]) == 0
    exported, model = load_file(tmp / "sae.safetensors"), load_file(tmp / "single.safetensors")
    _assert_equal(exported, model, exact=False)
    with safe_open(str(tmp / "sae.safetensors"), "pt") as handle:
        assert json.loads(handle.metadata()["config"])["parallel"] == {"data": 2, "latent": 2}
        assert handle.metadata()["step"] == "24"
    torch.testing.assert_close(load_trained_sae(run).params["W_dec"], model["param.W_dec"], **TOL)

    # torch ranks read their rows of the orbax checkpoint: saved again (as DCP) without a step,
    # it holds the same state; then one torch process continues from that.
    from sae_engine.parallel.launch import run_local

    orbax_state = _state(run)
    assert run_local(_train_torch_rank, 2, _overrides(run, 24, latent=2, backend="torch"), timeout=180) == [24, 24]
    assert (latest_dir(run) / "dcp").is_dir()
    _assert_equal(_state(run), orbax_state, exact=True)
    assert _train(_overrides(run, 27, backend="torch")) == 27
    print("ok")


def latest_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def _train_torch_rank(overrides: list[str]) -> int:
    import torch.distributed as dist

    step = _train(overrides)
    dist.destroy_process_group()
    return step


def _case_train(out: Path, steps: int, data: int, latent: int, kill_at: int | None = None) -> None:
    _train(_overrides(out, steps, data, latent), kill_at)


def _case_errors(tmp: Path) -> None:
    """Two host devices: a 2x2 mesh is a ConfigError naming the flag; so is torchrun."""
    from sae_engine.config import ConfigError

    out = tmp / "run"
    try:
        _train(_overrides(out, 4, data=2, latent=2))
        raise AssertionError("a 2x2 mesh on 2 devices trained")
    except ConfigError as error:
        assert "needs 4 JAX devices, JAX sees 2" in str(error) and "device_count=4" in str(error), error
    os.environ.update({"WORLD_SIZE": "2", "RANK": "0"})
    try:
        _train(_overrides(out, 4, latent=2))
        raise AssertionError("the JAX backend trained under torchrun")
    except ConfigError as error:
        assert "start it without torchrun" in str(error), error
    print("ok")


if __name__ == "__main__":
    case, *args = sys.argv[1:]
    if case == "backend":
        _case_backend()
        print("ok")
    elif case == "resume":
        _case_resume(Path(args[0]))
    elif case == "train":
        _case_train(Path(args[0]), *map(int, args[1:]))
    elif case == "equal":
        _assert_equal(_state(Path(args[0])), _state(Path(args[1])), exact=args[2] == "exact")
        print("ok")
    elif case == "errors":
        _case_errors(Path(args[0]))
