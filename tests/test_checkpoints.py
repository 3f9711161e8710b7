"""The checkpoints package: damaged checkpoints passed over on resume, one run per folder, failed
writes that keep the previous checkpoint, and checkpoints of the earlier layout."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_engine.checkpoints import (CheckpointWriteError, RunLock, RunLockedError, latest_checkpoint, load_checkpoint,
                                    newest_readable, step_folders, verify)
from sae_engine.checkpoints.runs import load_run_weights
from sae_engine.cli import main as cli_main
from sae_engine.config import load_config
from sae_engine.training.trainer import train

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "data" / "checkpoints"
SMALL = ["model.d_in=16", "model.n_latents=64", "model.k=4", "data.synthetic.tokens=1280", "data.buffer_size=256",
         "data.eval_tokens=64", "train.batch_size=64", "train.checkpoint_every=5", "train.progress=false",
         "train.precision='fp32'", "train.seed=3"]


def _config(run: Path, tokens: int, *extra: str):
    return load_config(None, SMALL + [f"train.out_dir='{run}'", f"train.max_tokens={tokens}", *extra])


def _truncate(file: Path) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size // 2)


def test_checkpoints_record_their_file_sizes_and_verify_finds_damage(tmp_path):
    run = tmp_path / "run"
    train(_config(run, 320))
    path = latest_checkpoint(run)
    files = json.loads((path / "meta.json").read_text())["files"]
    assert files == {name: (path / name).stat().st_size for name in ("model.safetensors", "state.safetensors")}
    assert verify(path) is None
    _truncate(path / "state.safetensors")
    assert "state.safetensors has" in verify(path) and "its meta.json says" in verify(path)
    (path / "state.safetensors").unlink()
    assert verify(path) == f"{path / 'state.safetensors'} is missing"


def test_a_truncated_latest_checkpoint_resumes_from_the_one_before(tmp_path, caplog):
    """Step 10 of 15 cut to half its size: the run resumes from step 5, naming both, and ends
    equal to an uninterrupted run."""
    whole, run = tmp_path / "whole", tmp_path / "run"
    train(_config(whole, 960))
    train(_config(run, 640))
    assert [p.name for p in step_folders(run)] == ["step_000000010", "step_000000005"]
    broken = latest_checkpoint(run)
    _truncate(broken / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="sae_engine"):
        result = train(_config(run, 960))
    before = run / "checkpoints" / "step_000000005"
    assert f"checkpoint {broken} cannot be read ({broken / 'model.safetensors'} has" in caplog.text
    assert f"resuming from step 5, checkpoint {before}" in caplog.text
    assert result.step == 15 and result.resumed_from == before
    want = load_file(str(latest_checkpoint(whole) / "model.safetensors"))
    got = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.equal(got[key], want[key]) for key in want)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_a_run_whose_checkpoints_are_all_unreadable_stops_and_says_so(tmp_path):
    run = tmp_path / "run"
    train(_config(run, 320))
    _truncate(latest_checkpoint(run) / "model.safetensors")
    code = cli_main(["train", "--set", f"train.out_dir='{run}'", *(f"--set={o}" for o in SMALL)])
    assert code == 1 and newest_readable(run).path is None


def test_a_latest_pointer_naming_a_missing_folder_is_passed_over(tmp_path, caplog):
    run = tmp_path / "run"
    train(_config(run, 320))
    (run / "checkpoints" / "latest").write_text("step_000000099\n")
    with caplog.at_level(logging.INFO, logger="sae_engine"):
        assert train(_config(run, 640)).step == 10
    assert "resuming from step 5" in caplog.text


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "sae_engine", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_second_run_on_a_held_folder_stops_at_once_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    # The first run is long and checkpoints only when stopped, so whatever appears in the folder
    # while the second one starts could only come from the second.
    overrides = [f"--set={o}" for o in SMALL + ["data.synthetic.tokens=50000000", "train.max_tokens=50000000",
                                                 "train.checkpoint_every=100000000", "train.log_every=10",
                                                 f"train.out_dir='{run}'"]]
    first = _cli("train", *overrides)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate(timeout=30)
            time.sleep(0.2)
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        started = time.monotonic()
        second = _cli("train", *overrides)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2 and time.monotonic() - started < 60
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sae-engine train: error: {run} is in use by another "
                                                       f"training run (process {first.pid})")
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before == [Path("config.json"), Path("metrics.jsonl")]
        assert first.poll() is None  # the first run trained on meanwhile
    finally:
        first.send_signal(signal.SIGINT)  # the first run checkpoints and ends
        first.communicate(timeout=120)
    assert first.returncode == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "fvu" in r]  # training records (evaluations share their step)
    assert steps == sorted(set(steps)) and len(steps) > 1  # one writer: in order, none twice


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom sae_engine.checkpoints import RunLock\n"
                               f"with RunLock({str(run)!r}):\n    print('held', flush=True)\n    time.sleep(300)"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"in use by another training run \\(process {holder.pid}\\)"):
        with RunLock(run):
            pass
    holder.kill()
    holder.wait(timeout=30)
    assert train(_config(run, 320)).step == 5


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The write of step 10 fails as a full disk does (the second safetensors file, half written):
    one line names the folder, the failure and the checkpoint kept, which still loads."""
    import sae_engine.checkpoints.single as single

    run = tmp_path / "run"
    train(_config(run, 320))
    real_save = single.save_file

    def save_or_fill(tensors, filename, metadata=None):
        if filename.endswith("state.safetensors"):
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real_save(tensors, filename, metadata)

    monkeypatch.setattr(single, "save_file", save_or_fill)
    code = cli_main(["train", *(f"--set={o}" for o in SMALL + [f"train.out_dir='{run}'", "train.max_tokens=640"])])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    kept = run / "checkpoints" / "step_000000005"
    assert code == 1 and len(err) == 1  # the log's progress lines, then the error in one line
    assert err[0] == (f"sae-engine train: error: cannot write checkpoint {run / 'checkpoints' / 'step_000000010'}: "
                      f"[Errno 28] No space left on device: '{run / 'checkpoints' / '.step_000000010.tmp' / 'state.safetensors'}'; "
                      f"the last complete checkpoint, {kept}, is kept")
    assert latest_checkpoint(run) == kept and verify(kept) is None
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())  # no half-written folder left
    monkeypatch.setattr(single, "save_file", real_save)
    assert load_checkpoint(kept)[1]["step"] == 5 and train(_config(run, 640)).step == 10


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a tmpfs needs root")
def test_a_real_full_disk(tmp_path):
    """The same on a real 4 MB tmpfs, where the model outgrows the disk at its second checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this machine does not let a test mount a tmpfs")
    try:
        run = disk / "run"
        overrides = [f"--set={o}" for o in SMALL + ["model.n_latents=8192", "model.d_in=16", f"train.out_dir='{run}'",
                                                     "train.max_tokens=640", "train.keep_checkpoints=3"]]
        proc = _cli("train", *overrides)
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 1 and lines[-1].startswith("sae-engine train: error: cannot write checkpoint ")
        assert "No space left on device" in lines[-1] and "is kept" in lines[-1]
        kept = latest_checkpoint(run)
        if kept is not None:
            assert verify(kept) is None and load_checkpoint(kept)[1]["step"] > 0
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_checkpoint_of_the_earlier_layout_loads_and_resumes_exactly(tmp_path):
    """A run written before checkpoints recorded their sizes: read as it is, and continued to step
    10 it equals that code's own uninterrupted 10-step run."""
    run = tmp_path / "legacy_run"
    shutil.copytree(FIXTURES / "legacy_run", run)
    path = latest_checkpoint(run)
    assert "files" not in json.loads((path / "meta.json").read_text()) and verify(path) is None
    assert load_run_weights(run).step == 5
    assert train(_config(run, 640)).step == 10
    want = load_file(str(FIXTURES / "legacy_step10_model.safetensors"))
    got = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert sorted(got) == sorted(want) and all(torch.equal(got[key], want[key]) for key in want)
