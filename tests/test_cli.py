"""The command line stays polite: runs without the optional extras, names a missing one in one
line, says when it resumes, and runs as ``python -m sae_engine``. Each case is a subprocess in
which fair-esm, scipy and JAX cannot be imported (they are installed here, so a meta-path finder
refuses them)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("esm", "scipy", "jax", "jaxlib", "flax", "optax", "obonet")

# Refuse the blocked packages as if absent, run the CLI, then fail if anything blocked or any
# sae_engine.esm module got imported anyway.
_RUNNER = f"""
import importlib.abc, sys
BLOCKED = {BLOCKED!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Refuse())
from sae_engine.cli import main
code = main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("sae_engine.esm"))
if leaked and {{"train", "--help"}} & set(sys.argv[1:2]):
    print("imported:", leaked, file=sys.stderr)
    code = 99
sys.exit(code)
"""

SMALL = ["model.d_in=8", "model.n_latents=32", "model.k=2", "data.synthetic.tokens=1024", "data.buffer_size=256",
         "data.eval_tokens=64", "train.batch_size=64", "train.progress=false", "train.precision='fp32'",
         "train.checkpoint_every=8", "train.eval_every=8", "train.log_every=8"]


def _run(*args: str, cwd: Path = REPO, module: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / ".alias"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sae_engine", *args] if module else [sys.executable, "-c", _RUNNER, *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_every_command_without_the_extras():
    done = _run("--help")
    assert done.returncode == 0, done.stderr
    for command in ("train", "extract", "splice", "data", "features", "enrich", "demo", "describe", "bench"):
        assert f"    {command}" in done.stdout


def test_train_on_synthetic_data_without_the_extras_then_resume_says_so(tmp_path):
    sets = [item for value in SMALL + [f"train.out_dir='{tmp_path / 'run'}'"] for item in ("--set", value)]
    first = _run("train", *sets)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("done: step 16, 1024 tokens") and "resuming" not in first.stderr
    again = _run("train", *sets)
    assert again.returncode == 0, again.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000000016"
    assert f"resuming from step 16, checkpoint {checkpoint}" in again.stderr


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">a\nMKV\n")
    done = _run("extract", "--fasta", str(fasta), "--layers", "1", "--out", str(tmp_path / "store"))
    assert done.returncode == 2
    assert done.stderr == ("sae-engine extract: error: needs the 'esm' extra (module 'esm' is missing): "
                           "pip install 'sae-engine[esm]'\n")
    assert not (tmp_path / "store").exists()
    done = _run("enrich", "--help")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "needs the 'analysis' extra (module 'scipy' is missing): pip install 'sae-engine[analysis]'" in done.stderr


def test_python_dash_m_runs_the_cli(tmp_path):
    done = _run("train", "--set", "model.k=0", module=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "sae-engine train: error: defaults: model.k = 0: must be a positive integer\n"
