"""Extraction: fast forward == fair-esm, batching invariance, pooling, the store, resumption."""
from __future__ import annotations

import argparse
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

pytest.importorskip("esm")

from sae_engine.training.buffer import RingBuffer  # noqa: E402
from sae_engine.esm import commands  # noqa: E402
from sae_engine.esm.batching import Tokenizer, plan_batches  # noqa: E402
from sae_engine.esm.extract import ExtractConfig, embed, ensure_store, extract_to_store  # noqa: E402
from sae_engine.esm.fasta import Record, write_fasta  # noqa: E402
from sae_engine.esm.forward import FastESM2  # noqa: E402
from sae_engine.esm.models import load_model, random_esm2  # noqa: E402
from esm_fixtures import save_hf_esm2  # noqa: E402
from sae_engine.esm.store import ActivationStore, StoreError, StoreSource  # noqa: E402
from sae_engine.data.sources import PairedSource  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def _proteins(count: int, lo: int = 5, hi: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi))) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny():
    model = random_esm2()
    return model, model.alphabet


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_esm2(random_esm2(seed=3), tmp_path_factory.mktemp("model") / "hf")


def test_fast_forward_matches_fair_esm(tiny) -> None:
    model, alphabet = tiny
    sequences = _proteins(6, 3, 40)
    tokens = Tokenizer(alphabet)(sequences)
    with torch.no_grad():
        want = model(tokens, repr_layers=[0, 1, 2])["representations"]
    got = FastESM2(model)(tokens, [0, 1, 2])
    raw_last = FastESM2(model)(tokens, [2], final_norm=False)[2]
    for i, sequence in enumerate(sequences):
        keep = slice(0, len(sequence) + 2)  # BOS, residues, EOS; padding is don't-care
        for layer in (0, 1, 2):
            torch.testing.assert_close(got[layer][i, keep], want[layer][i, keep], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model.emb_layer_norm_after(raw_last[i, keep]), want[2][i, keep], atol=1e-5, rtol=1e-5)


def test_tokens_match_fair_esm_batch_converter(tiny) -> None:
    _, alphabet = tiny
    sequences = ["MKT", "ACDEFGHIKLMNPQRSTVWYXBZUO"]
    want = alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])[2]
    assert torch.equal(Tokenizer(alphabet)(sequences), want)


def test_batched_equals_one_at_a_time(tiny) -> None:
    model, alphabet = tiny
    sequences = _proteins(20, 1, 70, seed=1)
    batched = embed(model, alphabet, sequences, [1, 2], max_tokens=400)
    single = embed(model, alphabet, sequences, [1, 2], max_tokens=3)  # every protein alone
    for b, s, sequence in zip(batched, single, sequences):
        for layer in (1, 2):
            assert b[layer].shape == (len(sequence), 32)
            torch.testing.assert_close(b[layer], s[layer], atol=1e-5, rtol=1e-5)


def test_pooling_is_over_residues_only(tiny) -> None:
    model, alphabet = tiny
    sequences = _proteins(7, 2, 30, seed=2)
    rows = embed(model, alphabet, sequences, [2])
    means = embed(model, alphabet, sequences, [2], pool="mean")
    maxes = embed(model, alphabet, sequences, [2], pool="max")
    for r, m, x in zip(rows, means, maxes):
        torch.testing.assert_close(m[2], r[2].mean(0), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(x[2], r[2].amax(0))


def test_bf16_error_is_bounded(tiny) -> None:
    model, alphabet = tiny
    sequences = _proteins(8, 10, 50, seed=4)
    fp32 = torch.cat([r[2] for r in embed(model, alphabet, sequences, [2])])
    bf16 = torch.cat([r[2] for r in embed(model, alphabet, sequences, [2], bf16=True)])
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 2e-2


def test_plan_batches_respects_the_budget() -> None:
    lengths = [random.Random(5).randint(1, 300) for _ in range(200)] + [900]
    batches = plan_batches(lengths, max_tokens=1024, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * (max(lengths[i] for i in batch) + 2) <= 1024
    assert plan_batches(lengths, 1024, seed=0) == batches  # deterministic


def _fasta(tmp_path: Path, sequences: list[str]) -> Path:
    path = tmp_path / "proteins.fasta"
    write_fasta([Record(f"P{i:05d}", s) for i, s in enumerate(sequences)], path)
    return path


def test_store_round_trip_and_sources(tmp_path: Path, tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir))
    sequences = _proteins(30, 5, 80, seed=6) + ["M" * 150]  # the last one is cropped into windows
    config = ExtractConfig(layers=(1, 2), max_tokens=300, shard_rows=200, max_residues=100, overlap=20, precision="fp32")
    summary = extract_to_store(_fasta(tmp_path, sequences), loaded, tmp_path / "store", config, progress=False)
    store = ActivationStore(tmp_path / "store")
    assert store.complete and len(store.manifest["shards"]) > 1
    assert store.manifest["model"]["weights_sha256"] == loaded.info.weights_sha256
    index = store.index()
    assert sorted(e["key"] for e in index) == sorted([f"P{i:05d}" for i in range(31)] + ["P00030@50"])
    assert summary.rows == len(store) == sum(e["residues"] for e in index)
    windows = {e["key"]: e for e in index}
    assert windows["P00030@50"]["start"] == 50 and windows["P00030@50"]["residues"] == 100
    # Rows in store order equal in-memory extraction of the same windows.
    texts = {f"P{i:05d}": s for i, s in enumerate(sequences)}
    expected = torch.cat([
        embed(loaded.model, loaded.alphabet, [texts[e["id"]][e["start"] : e["start"] + e["residues"]]], [2])[0][2]
        for e in index
    ])
    source = StoreSource(tmp_path / "store", 2, chunk_size=64)
    assert source.d == 32 and len(source) == expected.shape[0]
    torch.testing.assert_close(torch.cat(list(source.iter_from(0))), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(list(source.iter_from(77))), expected[77:], atol=1e-5, rtol=1e-5)
    # Transcoder pairs: two layers of one store stay aligned row by row.
    pair = PairedSource(StoreSource(tmp_path / "store", 1, chunk_size=64), source)
    assert pair.d == 64
    chunks = list(pair.iter_from(0))
    assert sum(c.shape[0] for c in chunks) == len(source)
    torch.testing.assert_close(torch.cat(chunks)[:, 32:], expected, atol=1e-5, rtol=1e-5)
    # The ring buffer serves every stored vector exactly once.
    buffer = RingBuffer(source, capacity=256, background=False)
    served = torch.cat(list(buffer.batches(50)))
    assert served.shape == expected.shape
    torch.testing.assert_close(served.sum(0), expected.sum(0), atol=1e-3, rtol=1e-4)
    with pytest.raises(StoreError, match="holds layers"):
        StoreSource(tmp_path / "store", 0)


def test_pooled_store_has_one_row_per_window(tmp_path: Path, tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir))
    config = ExtractConfig(layers=(2,), pool="mean", store_dtype="float16", shard_rows=4)
    extract_to_store(_fasta(tmp_path, _proteins(10, seed=7)), loaded, tmp_path / "store", config, progress=False)
    source = StoreSource(tmp_path / "store", 2)
    assert len(source) == 10 and next(source.iter_from(0)).dtype == torch.float16


def test_changed_settings_are_refused(tmp_path: Path, tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir))
    fasta = _fasta(tmp_path, _proteins(5, seed=8))
    extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(1,)), progress=False)
    again = extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(1,)), progress=False)
    assert again.skipped == 5 and again.residues == 0
    with pytest.raises(StoreError, match=r"settings\.layers"):
        extract_to_store(fasta, loaded, tmp_path / "store", ExtractConfig(layers=(2,)), progress=False)
    (tmp_path / "other").mkdir()
    other = _fasta(tmp_path / "other", _proteins(5, seed=12))
    with pytest.raises(StoreError, match=r"input\.sha256"):
        extract_to_store(other, loaded, tmp_path / "store", ExtractConfig(layers=(1,)), progress=False)


def test_ensure_store_extracts_once(tmp_path: Path, tiny_dir: Path) -> None:
    fasta = _fasta(tmp_path, _proteins(5, seed=11))
    with pytest.raises(StoreError, match="no FASTA"):
        ensure_store(tmp_path / "store", layers=[1])
    store = ensure_store(tmp_path / "store", layers=[1], fasta=fasta, model=str(tiny_dir), progress=False)
    assert store.complete and len(ensure_store(tmp_path / "store", layers=[1])) == len(store)


def test_resume_after_sigkill_has_every_protein_once(tmp_path: Path, tiny_dir: Path) -> None:
    sequences = _proteins(1500, 20, 120, seed=9)
    fasta = _fasta(tmp_path, sequences)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "sae_engine", "extract", "--fasta", str(fasta), "--model", str(tiny_dir),
               "--layers", "1,2", "--out", str(store), "--shard-rows", "1500", "--max-tokens", "2048", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add synchronisation
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and process.poll() is None:
        try:
            committed = len(json.loads((store / "manifest.json").read_text())["shards"])
        except (FileNotFoundError, json.JSONDecodeError):
            committed = 0
        if committed >= 3:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    process.wait()
    assert committed >= 3 and process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not ActivationStore(store).complete
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = ActivationStore(store)
    keys = [e["key"] for e in resumed.index()]
    assert resumed.complete and len(keys) == len(set(keys)) == len(sequences)
    assert len(resumed) == sum(map(len, sequences))
    for layer in (1, 2):
        assert sum(np.load(p, mmap_mode="r").shape[0] for p in resumed.shard_paths(layer)) == len(resumed)
    names = {p.name for p in (store / "shards").iterdir()}
    assert names == {f"{s['name']}.{part}" for s in resumed.manifest["shards"] for part in ("L1.npy", "L2.npy", "index.json")}


def test_cli_extract_and_errors(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    fasta = _fasta(tmp_path, _proteins(4, seed=10))
    args = parser.parse_args(["extract", "--fasta", str(fasta), "--model", str(tiny_dir), "--layers", "0,2",
                              "--out", str(tmp_path / "store"), "--pool", "max", "--quiet"])
    assert args.run(args) == 0
    assert "4 vectors from 4 windows" in capsys.readouterr().out
    bad = tmp_path / "bad.fasta"
    bad.write_text(">A\nMK7\n")
    args = parser.parse_args(["extract", "--fasta", str(bad), "--model", str(tiny_dir), "--layers", "1", "--out", str(tmp_path / "s2")])
    assert args.run(args) == 2
    assert "bad.fasta:2:3: record 'A': character '7'" in capsys.readouterr().err
    args = parser.parse_args(["extract", "--fasta", str(fasta), "--model", str(tiny_dir), "--layers", "5", "--out", str(tmp_path / "s3")])
    assert args.run(args) == 2
    assert "out of range" in capsys.readouterr().err
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    args = parser.parse_args(["extract", "--fasta", str(empty), "--model", str(tiny_dir), "--layers", "1", "--out", str(tmp_path / "s4")])
    assert args.run(args) == 2
    assert f"{empty}: no records" in capsys.readouterr().err
    assert not (tmp_path / "s4").exists()
