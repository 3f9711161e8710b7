"""ESM2 extraction precision (decided by the hardware, recorded, kept on resume) and devices."""
from __future__ import annotations

import json
import logging
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("esm")

from sae_engine.esm.batching import Tokenizer  # noqa: E402
from sae_engine.esm.extract import ExtractConfig, embed, extract_to_store  # noqa: E402
from sae_engine.esm.fasta import Record, write_fasta  # noqa: E402
from sae_engine.esm.forward import FastESM2, vectors  # noqa: E402
from sae_engine.esm.live import LiveSource  # noqa: E402
from sae_engine.esm.models import load_model, random_esm2  # noqa: E402
from esm_fixtures import save_hf_esm2  # noqa: E402
from sae_engine.esm.store import ActivationStore, StoreError  # noqa: E402
from sae_engine.training.precision import resolve_precision  # noqa: E402

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def _sequences(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(8, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_esm2(random_esm2(seed=4), tmp_path_factory.mktemp("model") / "hf")


@pytest.fixture(scope="module")
def loaded(model_dir: Path):
    return load_model(str(model_dir))


@pytest.fixture(scope="module")
def proteins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    sequences = _sequences(24, seed=1)
    path = tmp_path_factory.mktemp("fasta") / "proteins.fasta"
    write_fasta([Record(f"P{i:03d}", s) for i, s in enumerate(sequences)], path)
    return path, sequences


def _rows(store: Path, layer: int = 2) -> torch.Tensor:
    """A store's rows of ``layer`` ordered by window key (extraction order is shuffled)."""
    opened = ActivationStore(store)
    shards = {s["name"]: np.load(p) for s, p in zip(opened.manifest["shards"], opened.shard_paths(layer))}
    entries = sorted(opened.index(), key=lambda e: e["key"])
    return torch.from_numpy(np.concatenate([shards[e["shard"]][e["offset"] : e["offset"] + e["rows"]] for e in entries]))


def _in_memory(loaded, sequences: list[str], bf16: bool) -> torch.Tensor:
    """Layer 2 of ``sequences`` (in key order: P000, P001, ...) extracted in memory."""
    return torch.cat([r[2] for r in embed(loaded.model, loaded.alphabet, sequences, [2], bf16=bf16)])


def _computed_in(rows: torch.Tensor, loaded, sequences: list[str]) -> str:
    """Which dtype's in-memory extraction the rows are (they differ by ~1e-3 relative)."""
    errors = {name: ((rows - _in_memory(loaded, sequences, name == "bf16")).norm() / rows.norm()).item()
              for name in ("bf16", "fp32")}
    best = min(errors, key=errors.get)
    assert errors[best] < 1e-5 < max(errors.values()), errors
    return best


def test_auto_is_what_resolve_precision_says_and_is_recorded(tmp_path, loaded, proteins, caplog) -> None:
    fasta, sequences = proteins
    caplog.set_level(logging.INFO, logger="sae_engine")
    extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(2,)), progress=False)
    want = resolve_precision("auto", "cpu")
    recorded = ActivationStore(tmp_path / "store").manifest["precision_resolved"]
    assert recorded == {"dtype": want.dtype, "reason": want.reason}
    assert _computed_in(_rows(tmp_path / "store"), loaded, sequences) == want.dtype
    assert f"in {want.dtype} ({want.reason})" in caplog.text


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_an_explicit_precision_is_kept(tmp_path, loaded, proteins, dtype) -> None:
    fasta, sequences = proteins
    with warnings.catch_warnings():  # bf16 on a CPU without bf16 units warns; kept all the same
        warnings.simplefilter("ignore")
        extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(2,), precision=dtype), progress=False)
    assert ActivationStore(tmp_path / "store").manifest["precision_resolved"]["dtype"] == dtype
    assert _computed_in(_rows(tmp_path / "store"), loaded, sequences) == dtype


def _as_if_killed(store: Path, keep: int) -> None:
    """Leave ``store`` as a run killed after committing its first ``keep`` shards leaves it."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:keep], False
    (store / "manifest.json").write_text(json.dumps(manifest))


def test_a_resumed_store_keeps_its_precision(tmp_path, loaded, proteins) -> None:
    fasta, sequences = proteins
    store = tmp_path / "store"
    other = "fp32" if resolve_precision("auto", "cpu").dtype == "bf16" else "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_to_store(fasta, loaded, store, ExtractConfig(layers=(2,), precision=other, shard_rows=100, max_tokens=200), progress=False)
    assert len(ActivationStore(store).manifest["shards"]) > 3
    _as_if_killed(store, keep=2)
    resumed = extract_to_store(fasta, loaded, store, ExtractConfig(layers=(2,), shard_rows=100, max_tokens=200), progress=False)
    assert 0 < resumed.skipped < len(sequences)
    manifest = ActivationStore(store).manifest
    assert manifest["complete"] and manifest["precision_resolved"]["dtype"] == other
    assert _computed_in(_rows(store), loaded, sequences) == other  # the resumed shards too

    _as_if_killed(store, keep=2)
    mixed = "bf16" if other == "fp32" else "fp32"
    with pytest.raises(StoreError, match=f"computed in {other}; precision {mixed} would mix {mixed} and {other}"):
        extract_to_store(fasta, loaded, store, ExtractConfig(layers=(2,), precision=mixed, shard_rows=100, max_tokens=200), progress=False)
    assert len(ActivationStore(store).manifest["shards"]) == 2  # nothing committed is lost


def test_cli_precision_choice(tmp_path, model_dir, proteins, capsys, caplog) -> None:
    from sae_engine.cli import main

    fasta, _ = proteins
    model_dir = str(model_dir)
    caplog.set_level(logging.INFO, logger="sae_engine")
    assert main(["extract", "--fasta", str(fasta), "--model", model_dir, "--layers", "1", "--out", str(tmp_path / "s"),
                 "--precision", "fp32", "--quiet"]) == 0
    assert "in fp32 (requested;" in caplog.text
    assert ActivationStore(tmp_path / "s").manifest["precision_resolved"]["dtype"] == "fp32"
    with pytest.raises(SystemExit):
        main(["extract", "--fasta", str(fasta), "--model", model_dir, "--layers", "1", "--out", str(tmp_path / "t"),
              "--precision", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err


def test_live_source_computes_in_its_precision(loaded, proteins) -> None:
    fasta, sequences = proteins
    for precision in ("auto", "fp32"):
        live = LiveSource(fasta, loaded, [2], precision=precision, seed=None)
        assert live.precision == resolve_precision(precision, "cpu")
        rows = torch.cat(list(live.iter_from(0)))
        runner = FastESM2(loaded.model, bf16=live.precision.dtype == "bf16")  # the same batches, explicitly
        tokenizer = Tokenizer(loaded.alphabet)
        want = torch.cat([vectors(runner, tokenizer, [sequences[i] for i in batch], [2])[2] for batch in live.batches])
        assert torch.equal(rows, want)


@pytest.mark.parametrize(("precision", "resolved"), [("auto", None), ("fp32", None), ("auto", "fp32"), ("auto", "bf16")])
def test_training_sources_follow_the_runs_precision(tmp_path, model_dir, proteins, precision, resolved) -> None:
    """train.precision decided for the CPU, or the run's recorded train.precision_resolved."""
    from sae_engine.config import load_config
    from sae_engine.data.registry import build_source

    fasta, _ = proteins
    sets = ["model.d_in=32", "model.n_latents=64", "model.k=4", f"train.precision='{precision}'",
            f"train.out_dir='{tmp_path / 'run'}'", "train.progress=false", f"data.esm.fasta='{fasta}'",
            f"data.esm.model='{model_dir}'", "data.esm.layer=2"]
    if resolved:
        sets.append(f"train.precision_resolved='{resolved}'")
    with warnings.catch_warnings():  # bf16 on a CPU without bf16 units warns
        warnings.simplefilter("ignore")
        want = resolve_precision(resolved or precision, "cpu")
        build_source(load_config(None, sets + ["data.source='esm'", f"data.esm.store='{tmp_path / 'store'}'"]))
        live = build_source(load_config(None, sets + ["data.source='esm_live'"]))
    assert ActivationStore(tmp_path / "store").manifest["precision_resolved"]["dtype"] == want.dtype
    assert live.precision == want and live.runner.bf16 == (want.dtype == "bf16")


def test_forward_makes_every_tensor_on_the_models_device(loaded) -> None:
    """With the default device set to "meta", any tensor made without the model's device would
    be an empty meta tensor and break the forward; so equal results show none is."""
    sequences = _sequences(5, seed=2)
    tokenizer = Tokenizer(loaded.alphabet)
    want = {pool: vectors(FastESM2(loaded.model), tokenizer, sequences, [0, 2], pool) for pool in ("none", "mean")}
    with torch.device("meta"):
        runner = FastESM2(loaded.model, ffn_block=16)
        got = {pool: vectors(runner, tokenizer, sequences, [0, 2], pool) for pool in ("none", "mean")}
    for pool in want:
        for layer in (0, 2):
            assert got[pool][layer].device.type == "cpu"
            torch.testing.assert_close(got[pool][layer], want[pool][layer], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_extraction_on_cuda_equals_the_cpu_store(tmp_path, model_dir, proteins) -> None:
    fasta, _ = proteins
    cpu, gpu = load_model(str(model_dir)), load_model(str(model_dir))
    gpu.model.cuda()
    for name, model in (("cpu", cpu), ("cuda", gpu)):
        extract_to_store(fasta, model, tmp_path / name, ExtractConfig(layers=(1, 2), precision="fp32", shard_rows=100, max_tokens=200),
                         progress=False)
    assert ActivationStore(tmp_path / "cuda").manifest["precision_resolved"]["reason"].startswith("requested; CUDA")
    for layer in (1, 2):
        torch.testing.assert_close(_rows(tmp_path / "cuda", layer), _rows(tmp_path / "cpu", layer), atol=1e-4, rtol=1e-4)
    auto = extract_to_store(fasta, gpu, tmp_path / "auto", ExtractConfig(layers=(2,)), progress=False)
    assert auto.rows == len(ActivationStore(tmp_path / "cpu"))
