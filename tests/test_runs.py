"""One reader of a run's weights: single-process and sharded checkpoints, the SAE built on it, errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sae_engine.checkpoints import latest_checkpoint, load_checkpoint
from sae_engine.cli import main as cli_main
from sae_engine.config import load_config
from sae_engine.checkpoints.dcp import load_rows
from sae_engine.checkpoints.dcp_export import export_sharded
from sae_engine.parallel.launch import run_local
from sae_engine.data.registry import build_source
from sae_engine.checkpoints.runs import RunError, load_run_weights
from sae_engine.training.trained import load_trained_sae
from sae_engine.training.torch_backend import TorchSAE
from sae_engine.training.trainer import Trainer

SMALL = ["model.d_in=16", "model.n_latents=40", "model.k=4", "data.synthetic.tokens=1024", "data.buffer_size=256",
         "data.eval_tokens=64", "train.batch_size=32", "train.max_tokens=192", "train.progress=false",
         "train.checkpoint_every=3", "train.eval_every=100", "train.precision='fp32'", "train.warmup_steps=0",
         "train.device='cpu'"]


def _train(out_dir: str, latent: int) -> int:
    """One rank's run (also the whole run when latent = 1)."""
    config = load_config(None, SMALL + [f"train.out_dir='{out_dir}'", f"parallel.latent={latent}"])
    result = Trainer(config, build_source(config)).run()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result.step


def _full_sae(run: Path) -> TorchSAE:
    """The run's latest checkpoint with every state tensor, as the trainer resumes it."""
    path = latest_checkpoint(run)
    meta = json.loads((path / "meta.json").read_text())
    config = load_config(None, SMALL)
    sae = TorchSAE(config, torch.device("cpu"))
    sae.load_state_tensors(load_rows(path, sae.state_tensors(), config.model.n_latents, None),
                           meta["adam_count"], meta["aux_active"])
    return sae


def _check_reader(run: Path, model_file: dict[str, torch.Tensor], tmp_path: Path) -> None:
    weights = load_run_weights(run)
    assert sorted(weights.tensors) == sorted(model_file)
    assert all(torch.equal(weights.tensors[k], v) for k, v in model_file.items())
    assert weights.step == 6 and weights.config["model"]["n_latents"] == 40
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    got, want = load_trained_sae(run), _full_sae(run)
    for a, b in zip(got.encode(x), want.encode(x)):
        assert torch.equal(a, b)
    assert torch.equal(got.reconstruct(x), want.reconstruct(x))
    assert cli_main(["export", str(run), "--out", str(tmp_path / "native.safetensors")]) == 0
    exported = load_file(str(tmp_path / "native.safetensors"))
    assert all(torch.equal(exported[k], v) for k, v in model_file.items()) and len(exported) == len(model_file)


def test_single_process_run(tmp_path):
    run = tmp_path / "run"
    assert _train(str(run), 1) == 6
    _check_reader(run, load_file(str(latest_checkpoint(run) / "model.safetensors")), tmp_path)


def test_sharded_run_reads_whole_in_one_process(tmp_path):
    run = tmp_path / "run"
    assert run_local(_train, 2, str(run), 2, timeout=180) == [6, 6]
    assert (latest_checkpoint(run) / "dcp").is_dir()
    streamed = load_file(str(export_sharded(latest_checkpoint(run), tmp_path / "streamed.safetensors")))
    _check_reader(run, streamed, tmp_path)
    next((latest_checkpoint(run) / "dcp").glob("*.distcp")).unlink()
    with pytest.raises(RunError, match=f"cannot read the model of checkpoint {latest_checkpoint(run)}"):
        load_run_weights(run)


def test_unreadable_runs_are_one_clear_error(tmp_path):
    with pytest.raises(RunError, match=f"{tmp_path / 'nowhere'}: no such run folder"):
        load_run_weights(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no checkpoint"):
        load_trained_sae(tmp_path / "empty")
    run = tmp_path / "run"
    _train(str(run), 1)
    path = latest_checkpoint(run)
    meta = load_checkpoint(path)[1]
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(RunError, match=f"checkpoint {path} has format version 99"):
        load_run_weights(run)
    (path / "meta.json").write_text(json.dumps(meta))
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunError, match=f"cannot read the model of checkpoint {path}"):
        load_run_weights(run)
