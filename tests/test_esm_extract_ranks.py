"""Extraction under torchrun: 2 gloo ranks write one store equal to one process's, and resume a kill."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("esm")

from sae_engine.esm.extract import ExtractConfig, extract_to_store  # noqa: E402
from sae_engine.esm.fasta import Record, write_fasta  # noqa: E402
from sae_engine.esm.models import load_model, random_esm2  # noqa: E402
from esm_fixtures import save_hf_esm2  # noqa: E402
from sae_engine.esm.store import ActivationStore, StoreError, StoreSource, merge_rank_manifests  # noqa: E402
from sae_engine.parallel.launch import free_port, run_local  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LETTERS = "ACDEFGHIKLMNPQRSTVWY"
LAYERS = (1, 2)


def _config(shard_rows: int) -> ExtractConfig:
    # fp32: the one-process reference and the ranks compute in the same dtype on any CPU
    return ExtractConfig(layers=LAYERS, max_tokens=512, precision="fp32", shard_rows=shard_rows)


def _fasta(tmp_path: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    records = [Record(f"P{i}", "".join(rng.choice(LETTERS) for _ in range(rng.randint(5, 80)))) for i in range(count)]
    write_fasta(records, tmp_path / "proteins.fasta")
    return tmp_path / "proteins.fasta"


def _extract(fasta: str, model_dir: str, out: str, shard_rows: int) -> int:
    """One rank (or the one process): the library driver, one thread (threads would only contend)."""
    torch.set_num_threads(1)
    return extract_to_store(fasta, load_model(model_dir), out, _config(shard_rows), progress=False).windows


def _vectors(store: Path) -> dict[str, dict[int, np.ndarray]]:
    """Per window key, per layer: its rows as StoreSource streams them (store order)."""
    index = ActivationStore(store).index()
    assert len({e["key"] for e in index}) == len(index), f"{store} holds a window twice"
    out: dict[str, dict[int, np.ndarray]] = {e["key"]: {} for e in index}
    for layer in LAYERS:
        rows = torch.cat(list(StoreSource(store, layer, chunk_size=97).iter_from(0))).numpy()
        at = 0
        for entry in index:
            out[entry["key"]][layer] = rows[at : at + entry["rows"]]
            at += entry["rows"]
        assert at == len(rows)
    return out


def _assert_same_content(got: Path, want: Path) -> None:
    a, b = _vectors(got), _vectors(want)
    assert a.keys() == b.keys()
    for key in b:
        for layer in LAYERS:
            np.testing.assert_array_equal(a[key][layer], b[key][layer], err_msg=f"window {key}, layer {layer}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_hf_esm2(random_esm2(seed=3), tmp_path_factory.mktemp("model") / "hf")


def test_two_ranks_write_one_store_equal_to_one_process(tmp_path: Path, model_dir: Path) -> None:
    fasta = _fasta(tmp_path, 60, seed=1)
    threads = torch.get_num_threads()
    try:
        _extract(str(fasta), str(model_dir), str(tmp_path / "one"), 300)
    finally:
        torch.set_num_threads(threads)
    shares = run_local(_extract, 2, str(fasta), str(model_dir), str(tmp_path / "two"), 300, timeout=60)
    assert sum(shares) == 60 and min(shares) > 0
    store = ActivationStore(tmp_path / "two")
    assert store.complete and not list((tmp_path / "two").glob("manifest.rank*.json"))
    assert {s["name"].split("-")[0] for s in store.manifest["shards"]} == {"r0", "r1"}
    _assert_same_content(tmp_path / "two", tmp_path / "one")


def _launch(command: list[str], rank: int, world: int, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _extract_command(fasta: Path, model_dir: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "sae_engine", "extract", "--fasta", str(fasta), "--model", str(model_dir),
            "--layers", "1,2", "--out", str(store), "--shard-rows", "400", "--max-tokens", "512",
            "--precision", "fp32", "--quiet"]


def _run_ranks(command: list[str], world: int) -> list[tuple[str, str]]:
    """The extraction under ``world`` torchrun-style ranks to the end; their (stdout, stderr)."""
    port = free_port()
    ranks = [_launch(command, rank, world, port) for rank in range(world)]
    outputs = [process.communicate(timeout=60) for process in ranks]
    assert [p.returncode for p in ranks] == [0] * world, [err[-2000:] for _, err in outputs]
    return outputs


def _kill_mid_run(command: list[str], store: Path, world: int) -> list[dict]:
    """Start ``world`` ranks, SIGKILL them all once the last rank has committed two shards (as
    torchrun stops the group when one rank dies); -> that rank's committed shards at the kill."""
    last = store / f"manifest.rank{world - 1}.json"
    port = free_port()
    ranks = [_launch(command, rank, world, port) for rank in range(world)]
    deadline, committed = time.monotonic() + 30, []
    while time.monotonic() < deadline and ranks[-1].poll() is None:
        try:
            committed = json.loads(last.read_text())["shards"]
        except (FileNotFoundError, json.JSONDecodeError):
            committed = []
        if len(committed) >= 2:
            break
        time.sleep(0.005)
    for process in ranks:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    assert len(committed) >= 2 and ranks[-1].returncode == -signal.SIGKILL
    assert not (store / "manifest.json").exists()
    killed = json.loads(last.read_text())
    assert not killed["complete"]  # mid-run
    return killed["shards"]


def _one_process_store(fasta: Path, model_dir: Path, out: Path) -> Path:
    threads = torch.get_num_threads()
    try:
        _extract(str(fasta), str(model_dir), str(out), 400)
    finally:
        torch.set_num_threads(threads)
    return out


def _assert_whole_store(store: Path, kept: list[dict]) -> None:
    """Complete, the shards committed before the kill kept, every shard once, no stray file."""
    resumed = ActivationStore(store)
    names = [s["name"] for s in resumed.manifest["shards"]]
    assert resumed.complete and {s["name"] for s in kept} <= set(names) and len(names) == len(set(names))
    assert {p.name.split(".")[0] for p in (store / "shards").iterdir()} == set(names)
    assert not list(store.glob("manifest.rank*.json"))


def test_killed_rank_resumes_its_share(tmp_path: Path, model_dir: Path) -> None:
    fasta = _fasta(tmp_path, 400, seed=2)
    store = tmp_path / "store"
    command = _extract_command(fasta, model_dir, store)
    committed = _kill_mid_run(command, store, 2)
    with pytest.raises(StoreError, match=r"manifest.rank[01].json is missing or incomplete: rank [01] of 2 did not finish"):
        merge_rank_manifests(store, 2)
    assert not (store / "manifest.json").exists()
    shutil.copytree(store, tmp_path / "taken_over")

    outputs = _run_ranks(command, 2)
    skipped = int(outputs[1][0].split("(")[1].split()[0].replace(",", ""))
    assert skipped == sum(s["windows"] for s in committed) > 0  # rank 1 kept what it had committed
    _assert_whole_store(store, committed)
    one = _one_process_store(fasta, model_dir, tmp_path / "one")
    _assert_same_content(store, one)

    # without torchrun, one process takes over the killed ranks' shards and finishes the rest
    _one_process_store(fasta, model_dir, tmp_path / "taken_over")
    _assert_whole_store(tmp_path / "taken_over", committed)
    _assert_same_content(tmp_path / "taken_over", one)


@pytest.mark.parametrize("killed,resumed", [(2, 3), (2, 1), (3, 2)], ids=["2to3", "2to1", "3to2"])
def test_killed_store_resumed_by_another_number_of_ranks(tmp_path: Path, model_dir: Path, killed: int, resumed: int) -> None:
    """Batches are dealt anew over the new ranks; every window committed before the kill is kept
    and none is computed twice, so the store equals one process's."""
    fasta = _fasta(tmp_path, 400, seed=2)
    store = tmp_path / "store"
    command = _extract_command(fasta, model_dir, store)
    committed = _kill_mid_run(command, store, killed)
    # what a kill between a shard's files and its manifest entry leaves: files of no committed shard
    leftover = store / "shards" / f"r{killed - 1}-{len(committed):06d}"
    np.save(leftover.with_suffix(".L1.npy"), np.zeros((3, 4), np.float32))
    leftover.with_suffix(".index.json").write_text("{}")
    before = {p.name: json.loads(p.read_text())["shards"] for p in store.glob("manifest.rank*.json")}
    kept = [shard for shards in before.values() for shard in shards]
    outputs = _run_ranks(command, resumed)
    if resumed > 1:  # each rank reports how many of its windows were already there
        skipped = sum(int(out.split("(")[1].split()[0].replace(",", "")) for out, _ in outputs)
        assert skipped == sum(s["windows"] for s in kept) >= sum(s["windows"] for s in committed) > 0
    _assert_whole_store(store, kept)
    _assert_same_content(store, _one_process_store(fasta, model_dir, tmp_path / "one"))
