"""A run computes in the precision decided at its start, records it, and keeps it on resume.

Which hardware a run starts or resumes on is simulated by the CPU description that
``sae_engine.training.precision`` reads (``/proc/cpuinfo`` texts of a Zen 4 and a Zen 3 EPYC); the
training itself is real.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from sae_engine.training import precision as precision_module
from sae_engine.checkpoints import latest_checkpoint
from sae_engine.config import load_config
from sae_engine.training.precision import resolve_precision
from sae_engine.data.registry import build_source
from sae_engine.training.trainer import Trainer
from sae_kernels.hardware import parse_cpuinfo

ZEN4 = parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512_bf16\n")
ZEN3 = parse_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: avx avx2 fma\n")
COMMON = ["model.d_in=16", "model.n_latents=64", "model.k=4", "data.synthetic.tokens=1280", "data.buffer_size=256",
          "data.eval_tokens=64", "train.batch_size=64", "train.checkpoint_every=5", "train.progress=false"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _trainer(run: Path, *extra: str) -> Trainer:
    config = load_config(None, COMMON + [f"train.out_dir='{run}'", *extra])
    return Trainer(config, build_source(config))


def _recorded(run: Path) -> tuple[str, str]:
    """precision_resolved as config.json and the latest checkpoint's meta.json record it."""
    config = json.loads((run / "config.json").read_text())
    meta = json.loads((latest_checkpoint(run) / "meta.json").read_text())
    return config["train"]["precision_resolved"], meta["config"]["train"]["precision_resolved"]


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_a_run_records_the_precision_auto_resolves_to(tmp_path, backend, caplog):
    if backend == "jax":
        pytest.importorskip("jax")
    expected = resolve_precision("auto", "cpu")  # this machine's
    with caplog.at_level(logging.INFO, logger="sae_engine"):
        trainer = _trainer(tmp_path, f"train.backend='{backend}'", "train.max_tokens=320")
    assert f"computing in {expected.dtype} ({expected.reason})" in caplog.text
    assert trainer.backend.precision == expected.dtype
    assert trainer.buffer.storage.dtype == DTYPES[expected.dtype]  # the ring buffer follows the choice
    result = trainer.run()
    assert result.step == 5 and result.final["fvu"] < 1.0
    assert _recorded(tmp_path) == (expected.dtype, expected.dtype)


def test_resuming_keeps_the_precision_the_run_started_with(tmp_path, monkeypatch, caplog):
    # Started on a CPU with bf16 units: auto means bf16.
    monkeypatch.setattr(precision_module, "cpu_info", lambda: ZEN4)
    _trainer(tmp_path, "train.max_tokens=320").run()
    assert _recorded(tmp_path) == ("bf16", "bf16")

    # Resumed on one without: still bf16, with the warning that this hardware emulates it.
    monkeypatch.setattr(precision_module, "cpu_info", lambda: ZEN3)
    with pytest.warns(UserWarning, match="emulated"), caplog.at_level(logging.INFO, logger="sae_engine"):
        trainer = _trainer(tmp_path, "train.max_tokens=640")
    assert "computing in bf16 (recorded when the run started; here: emulated on AMD EPYC 7B13" in caplog.text
    assert trainer.backend.precision == "bf16" and trainer.buffer.storage.dtype == torch.bfloat16
    assert trainer.run().step == 10
    assert _recorded(tmp_path) == ("bf16", "bf16")

    # An explicit request for another dtype does not change a run under way; it says so.
    monkeypatch.setattr(precision_module, "cpu_info", lambda: ZEN4)
    with pytest.warns(UserWarning, match="train.precision = 'fp32' is not applied"):
        trainer = _trainer(tmp_path, "train.precision='fp32'")
    assert trainer.backend.precision == "bf16"


def test_a_run_started_in_fp32_resumes_in_fp32_where_bf16_is_native(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "cpu_info", lambda: ZEN3)
    _trainer(tmp_path, "train.max_tokens=320").run()
    assert _recorded(tmp_path) == ("fp32", "fp32")
    monkeypatch.setattr(precision_module, "cpu_info", lambda: ZEN4)
    trainer = _trainer(tmp_path, "train.max_tokens=640")
    assert trainer.backend.precision == "fp32" and trainer.buffer.storage.dtype == torch.float32
    trainer.run()
    assert _recorded(tmp_path) == ("fp32", "fp32")
