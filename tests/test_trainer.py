"""The training loop end to end: runs, resume after kill -9, signals, bad data, bad configs."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_engine.checkpoints import latest_checkpoint
from sae_engine.cli import main as cli_main
from sae_engine.config import ConfigError, RunConfig, load_config
from sae_engine.training.trainer import TrainingError, train

REPO = Path(__file__).resolve().parent.parent

SMALL = [
    "model.d_in=16", "model.n_latents=96", "model.k=4", "model.dead_tokens=512",
    "data.synthetic.tokens=6400", "data.buffer_size=512", "data.eval_tokens=256",
    "train.batch_size=64", "train.log_every=10", "train.eval_every=50", "train.checkpoint_every=25",
    "train.warmup_steps=5", "train.progress=false", "train.precision='fp32'", "train.lr=1e-3",
]


def _config(tmp_path: Path, *extra: str):
    return load_config(None, SMALL + [f"train.out_dir='{tmp_path / 'run'}'", *extra])


def test_training_run_logs_evaluates_checkpoints_and_plots(tmp_path):
    result = train(_config(tmp_path))
    run = tmp_path / "run"
    assert result.step == 100 and result.tokens == 6400
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "fvu" in r]
    assert [r["step"] for r in train_records] == list(range(10, 101, 10))
    for key in ("loss", "fvu", "aux_loss", "l0", "dead_fraction", "dense_fraction", "tokens_per_s", "lr"):
        assert all(np.isfinite(r[key]) for r in train_records), key
    assert train_records[-1]["fvu"] < 0.5 * train_records[0]["fvu"]
    assert all(r["l0"] <= 4 for r in train_records)
    assert [r["step"] for r in records if "eval_fvu" in r] == [50, 100]
    assert (run / "curves.png").stat().st_size > 10_000
    latest = latest_checkpoint(run)
    assert latest.name == "step_000000100"
    model = load_file(str(latest / "model.safetensors"))
    assert model["param.W_dec"].shape == (96, 16)
    assert torch.allclose(model["param.W_dec"].norm(dim=1), torch.ones(96), atol=1e-5)
    assert "adam.m.W_enc" in load_file(str(latest / "state.safetensors"))


@pytest.mark.parametrize(
    "extra",
    [
        ["model.kind='batchtopk'"],
        ["train.optimizer='row_sparse_adam'", "model.multi_topk=true"],
        ["model.normalize='layernorm'", "train.precision='bf16'", "train.decay='linear'"],
    ],
)
def test_model_variants_train(tmp_path, extra):
    result = train(_config(tmp_path, *extra, "data.synthetic.tokens=3200"))
    assert result.step == 50 and result.final["fvu"] < 1.0


def test_transcoder_with_skip_connection_trains_from_shards(tmp_path):
    g = np.random.default_rng(0)
    x = g.standard_normal((3000, 12)).astype(np.float32)
    y = (x @ g.standard_normal((12, 10)) + 0.1 * g.standard_normal((3000, 10))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    config = _config(
        tmp_path, "model.d_in=12", "model.d_out=10", "model.skip_connection=true", "data.source='shards'",
        f"data.shards.paths=['{tmp_path / 'x.npy'}']", f"data.shards.target_paths=['{tmp_path / 'y.npy'}']", "train.lr=1e-2",
    )
    result = train(config)
    assert result.step == (3000 - 256) // 64
    model = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert model["param.W_skip"].abs().sum() > 0 and model["param.W_dec"].shape == (96, 10)
    assert result.final["eval_fvu"] < 0.25  # y is a linear map of x plus 1% noise


def _launch(tmp_path: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "sae_engine.cli", "train"]
    for item in SMALL + [f"train.out_dir='{tmp_path / 'run'}'", *extra]:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not (run / "checkpoints" / "latest").exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


LONG = ["data.synthetic.tokens=19200", "train.checkpoint_every=7", "model.n_latents=256"]


def test_resume_after_kill_9_is_bitwise_identical(tmp_path):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    train(_config(reference_dir, *LONG))
    reference = load_file(str(latest_checkpoint(reference_dir / "run") / "model.safetensors"))

    process = _launch(tmp_path, *LONG)
    _wait_for_checkpoint(tmp_path / "run", process)
    time.sleep(random.uniform(0.0, 0.5))  # any moment after the first checkpoint
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = latest_checkpoint(tmp_path / "run").name

    result = train(_config(tmp_path, *LONG))
    assert result.step == 300
    resumed = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert killed_at != "step_000000300"
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), name
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "fvu" in r]
    assert steps == sorted(set(steps)), "the resumed log repeats or skips steps"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    process = _launch(tmp_path, *LONG)
    _wait_for_checkpoint(tmp_path / "run", process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "interrupted" in out
    step = int(latest_checkpoint(tmp_path / "run").name.split("_")[1])
    assert 0 < step < 300 and f"step {step}," in out


def test_nan_activations_stop_with_a_clear_message_and_keep_the_last_checkpoint(tmp_path):
    data = np.random.default_rng(1).standard_normal((4000, 16)).astype(np.float32)
    data[3500] = np.nan
    np.save(tmp_path / "acts.npy", data)
    config = _config(tmp_path, "data.source='shards'", f"data.shards.paths=['{tmp_path / 'acts.npy'}']",
                     "train.checkpoint_every=5", "data.buffer_size=256")
    with pytest.raises(TrainingError, match=r"step \d+: the activation batch holds 16 NaN/Inf values"):
        train(config)
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "model.safetensors")).values())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.k=200"], "model.k = 200: must not exceed model.n_latents = 96"),
        (["model.kind='relu'"], "model.kind = 'relu': must be one of"),
        (["data.source='shards'", "data.shards.paths=['/nonexistent/a.npy']"], "data.shards.paths = '/nonexistent/a.npy': file not found"),
        (["train.typo=1"], r"unknown key\(s\) \['typo'\] in \[train\]"),
        (["model.skip_connection=true"], "needs a transcoder"),
        (["data.buffer_size=100"], "must hold at least two batches"),
        (["data.layer=3"], r"data.layer is now data.esm.layer"),
        (["data.synthetic_tokens=10"], r"data.synthetic_tokens is now data.synthetic.tokens"),
        (["data.esm.layr=3"], r"unknown key\(s\) \['layr'\] in \[data.esm\]"),
        (["data.nope.x=1"], r"\[data.nope\]: no activation source reads this table"),
        (["data.source='nope'"], r"data.source = 'nope': must be one of \['esm', 'esm_live', 'shards', 'synthetic'\]"),
        (["data.source='esm_live'"], r"data.esm.fasta = '': source = 'esm_live' needs a FASTA file"),
        (["data.synthetic.tokens=0"], r"data.synthetic.tokens = 0: must be a positive integer"),
    ],
)
def test_bad_configs_get_one_clear_error(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, *overrides)


def test_shards_of_the_wrong_width_are_named(tmp_path):
    np.save(tmp_path / "acts.npy", np.zeros((1000, 20), np.float32))
    config = _config(tmp_path, "data.source='shards'", f"data.shards.paths=['{tmp_path / 'acts.npy'}']")
    with pytest.raises(ConfigError, match="shards have d=20 but model.d_in = 16"):
        train(config)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nk = 3\n")
    assert cli_main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sae-engine train: error: {bad}: not valid TOML") and err.count("\n") == 1
    assert cli_main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_example_configs_load():
    from sae_engine.apps.study_config import load_study

    for path in (REPO / "examples").glob("*.toml"):
        if path.name.startswith("study_"):  # a study file, not a run config
            assert load_study(path).points()
        elif "shards" not in path.read_text():
            config = load_config(path)
            assert config.model.k <= config.model.n_latents


def _small_esm2_and_fasta(tmp_path, prefix: str, seed: int, count: int, lengths: tuple[int, int]):
    """A real fair-esm ESM2 (2 layers, width 32, random weights) saved in Hugging Face format, and
    a FASTA of ``count`` random proteins with lengths in ``lengths``. -> (model dir, FASTA path)."""
    from sae_engine.esm.models import random_esm2
    from esm_fixtures import save_hf_esm2

    model_dir = save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp_path / "esm2")
    g = np.random.default_rng(seed)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    fasta = tmp_path / "proteins.fasta"
    fasta.write_text("".join(f">{prefix}{i:03d}\n{''.join(g.choice(letters, g.integers(*lengths)))}\n" for i in range(count)))
    return model_dir, fasta


def test_training_on_esm2_activations_extracts_the_store_then_trains(tmp_path):
    """data.source = "esm": a real fair-esm ESM2 (small, random weights) feeds the trainer."""
    model_dir, fasta = _small_esm2_and_fasta(tmp_path, "P", seed=3, count=60, lengths=(30, 90))
    config = _config(
        tmp_path, "model.d_in=32", "data.source='esm'", f"data.esm.store='{tmp_path / 'store'}'", "data.esm.layer=1",
        f"data.esm.fasta='{fasta}'", f"data.esm.model='{model_dir}'", "data.eval_tokens=128",
    )
    result = train(config)
    residues = sum(len(line) for line in fasta.read_text().splitlines() if not line.startswith(">"))
    assert result.step == (residues - 128) // 64
    assert (tmp_path / "store" / "manifest.json").exists()
    assert np.isfinite(result.final["eval_fvu"]) and result.final["l0"] <= 4


def test_live_esm2_source_equals_the_store_and_trains(tmp_path):
    """data.source = "esm_live": the same vectors as an extracted store, computed while training."""
    from sae_engine.esm.extract import ExtractConfig, extract_to_store
    from sae_engine.esm.store import ActivationStore
    from sae_engine.esm.live import LiveSource
    from sae_engine.esm.models import load_model

    model_dir, fasta = _small_esm2_and_fasta(tmp_path, "L", seed=5, count=40, lengths=(20, 70))
    loaded = load_model(str(model_dir))
    live = LiveSource(fasta, loaded, [1, 2])
    extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(1, 2)), progress=False)
    store = ActivationStore(tmp_path / "store")
    stored = np.concatenate([np.load(p) for p in store.shard_paths(1)])
    streamed = torch.cat(list(live.iter_from(0)))
    assert streamed.shape == (len(stored), 64) and len(live) == len(stored)
    np.testing.assert_allclose(streamed[:, :32].numpy(), stored, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.cat(list(live.iter_from(777))), streamed[777:])

    config = _config(
        tmp_path, "model.d_in=32", "model.d_out=32", "data.source='esm_live'", "data.esm.layer=1",
        "data.esm.target_layer=2", f"data.esm.fasta='{fasta}'", f"data.esm.model='{model_dir}'", "data.eval_tokens=128",
    )
    result = train(config)
    assert result.step == (len(stored) - 128) // 64 and np.isfinite(result.final["eval_fvu"])


def test_trainer_takes_any_source_and_third_parties_register_theirs(tmp_path, monkeypatch):
    """Trainer(config, source) reads whatever it is given; a registered source gets its own table."""
    from dataclasses import dataclass

    from sae_engine.data import registry
    from sae_engine.data.sources import ArraySource

    data = torch.from_numpy(np.random.default_rng(2).standard_normal((1600, 16)).astype(np.float32))
    result = train(_config(tmp_path), ArraySource(data))
    assert result.step == (1600 - 256) // 64

    @dataclass
    class PlantedOptions:
        scale: float = 1.0

    def check(options, config):
        if options.scale <= 0:
            raise ConfigError(f"data.planted.scale = {options.scale}: must be positive")

    built = []

    def build(options, config):
        built.append(options.scale)
        return ArraySource(options.scale * data)

    monkeypatch.setitem(registry._registered, "planted", registry.SourceSpec("planted", PlantedOptions, build, check))
    with pytest.raises(ConfigError, match="data.planted.scale = -1.0: must be positive"):
        _config(tmp_path, "data.source='planted'", "data.planted.scale=-1.0")
    config = _config(tmp_path / "planted", "data.source='planted'", "data.planted.scale=2.0")
    assert train(config).step == (1600 - 256) // 64 and built == [2.0]
    assert json.loads((tmp_path / "planted" / "run" / "config.json").read_text())["data"]["planted"] == {"scale": 2.0}
    saved = json.loads((tmp_path / "planted" / "run" / "config.json").read_text())
    expected = config.to_dict()  # the run records the dtype it computes in, without writing it into config
    expected["train"]["precision_resolved"] = saved["train"]["precision_resolved"]
    assert RunConfig.from_dict(saved).to_dict() == expected  # a saved config loads back as it was


def test_a_source_of_the_wrong_width_or_an_empty_shard_is_refused(tmp_path):
    from sae_engine.data.sources import ArraySource

    with pytest.raises(ConfigError, match=r"vectors of d=12, but the model needs d=16 \(model.d_in\)"):
        train(_config(tmp_path), ArraySource(torch.zeros(1000, 12)))
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    config = _config(tmp_path, "data.source='shards'", f"data.shards.paths=['{tmp_path / 'empty.npy'}']")
    with pytest.raises(ValueError, match="empty.npy holds no rows"):
        train(config)
