"""Per-protein pooling of residue codes (trained SAE and ESM2 neurons) against brute force."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_engine.config import load_config
from sae_engine.esm.extract import ActivationStore
from sae_engine.esm.models import random_esm2
from esm_fixtures import save_hf_esm2
from sae_engine.evaluation.features import ProteinActivations, load_sae_code, neuron_code, protein_activations, write_study_tsv
from sae_engine.training.trainer import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A residue-level store of 30 random proteins (one longer than a window) and an SAE on it."""
    tmp = tmp_path_factory.mktemp("features")
    model_dir = save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp / "esm2")
    g = np.random.default_rng(4)
    letters = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    lengths = [int(g.integers(20, 80)) for _ in range(29)] + [1100]  # the last one is windowed
    fasta = tmp / "proteins.fasta"
    fasta.write_text("".join(f">Q{i:03d}\n{''.join(g.choice(letters, n))}\n" for i, n in enumerate(lengths)))
    config = load_config(None, [
        "model.d_in=32", "model.n_latents=64", "model.k=4", "data.source='esm'", f"data.esm.store='{tmp / 'store'}'",
        "data.esm.layer=1", f"data.esm.fasta='{fasta}'", f"data.esm.model='{model_dir}'", "data.eval_tokens=64",
        "data.buffer_size=512", "train.batch_size=64", "train.progress=false", "train.precision='fp32'",
        f"train.out_dir='{tmp / 'run'}'",
    ])
    train(config)
    return tmp


def _brute_force(store_dir, code, n_features):
    store = ActivationStore(store_dir)
    rows = {w["id"]: [] for w in store.index()}
    arrays = {s["name"]: np.load(p) for s, p in zip(store.manifest["shards"], store.shard_paths(1))}
    for w in store.index():
        rows[w["id"]].append(arrays[w["shard"]][w["offset"] : w["offset"] + w["rows"]])
    dense_max, dense_frac = {}, {}
    for protein, parts in rows.items():
        values, indices = code(torch.from_numpy(np.concatenate(parts)))
        acts = torch.zeros(values.shape[0], n_features).scatter_(1, indices.clamp_min(0), values.float())
        dense_max[protein] = acts.max(dim=0).values.numpy()
        dense_frac[protein] = (acts > 0).float().mean(dim=0).numpy()
    return dense_max, dense_frac


@pytest.mark.parametrize("which", ["sae", "neurons"])
def test_pooled_activations_equal_brute_force(trained, which):
    store = trained / "store"
    code, n = load_sae_code(trained / "run") if which == "sae" else (neuron_code, 32)
    pooled = protein_activations(store, 1, code, n, batch_rows=50)
    assert pooled.max.shape == (30, n) and sorted(pooled.ids) == [f"Q{i:03d}" for i in range(30)]
    want_max, want_frac = _brute_force(store, code, n)
    for row, protein in enumerate(pooled.ids):
        np.testing.assert_allclose(pooled.max[row].toarray()[0], want_max[protein], rtol=1e-6)
        np.testing.assert_allclose(pooled.frac[row].toarray()[0], want_frac[protein], rtol=1e-6)
    assert pooled.max.nnz > 0


def test_saved_activations_round_trip_and_feed_enrichment(trained, tmp_path):
    code, n = load_sae_code(trained / "run")
    pooled = protein_activations(trained / "store", 1, code, n)
    pooled.save(tmp_path / "acts.npz")
    again = ProteinActivations.load(tmp_path / "acts.npz")
    assert again.ids == pooled.ids and (again.max != pooled.max).nnz == 0
    lines = write_study_tsv(pooled, tmp_path / "study.tsv", top_n=5)
    text = (tmp_path / "study.tsv").read_text().splitlines()
    assert len(text) == lines and all(len(line.split("\t")) == 2 for line in text)
    per_feature = {}
    for line in text:
        per_feature.setdefault(line.split("\t")[0], []).append(line)
    assert max(len(v) for v in per_feature.values()) <= 5


def test_protein_level_stores_give_each_protein_its_own_code(tmp_path):
    from sae_engine.esm.extract import ExtractConfig, extract_to_store
    from sae_engine.esm.models import load_model

    model_dir = save_hf_esm2(random_esm2(num_layers=2, embed_dim=32, attention_heads=4), tmp_path / "esm2")
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">A\nACDEFGHIKL\n>B\nMNPQRSTVWYACDE\n")
    extract_to_store(fasta, load_model(str(model_dir)), tmp_path / "store", ExtractConfig(layers=(1,), pool="mean"),
                     progress=False)
    pooled = protein_activations(tmp_path / "store", 1, neuron_code, 32)
    rows = {w["id"]: w for w in ActivationStore(tmp_path / "store").index()}
    vectors = np.concatenate([np.load(p) for p in ActivationStore(tmp_path / "store").shard_paths(1)])
    for i, protein in enumerate(pooled.ids):
        want = np.maximum(vectors[rows[protein]["offset"]], 0)
        np.testing.assert_allclose(pooled.max[i].toarray()[0], want, rtol=1e-6)
        assert set(pooled.frac[i].data) <= {1.0}


def test_a_missing_store_is_named(tmp_path):
    with pytest.raises(ValueError, match="not an activation store"):
        protein_activations(tmp_path, 1, neuron_code, 32)


def test_dense_pooling_equals_brute_force_and_mean_vectors_equal_a_mean_pooled_store(trained):
    from sae_engine.evaluation.features import mean_vectors, pooled_dense, signed_neurons, topk_code

    store = trained / "store"

    def signed_code(x):
        y = signed_neurons(x)
        return y, torch.arange(y.shape[1]).expand(y.shape[0], -1)

    dense = pooled_dense(store, 1, signed_neurons, 64, batch_rows=100)
    want_max, want_frac = _brute_force(store, signed_code, 64)
    assert dense.max.shape == (30, 64)
    for row, protein in enumerate(dense.ids):
        np.testing.assert_allclose(dense.max[row].toarray()[0], want_max[protein], rtol=1e-6)
        np.testing.assert_allclose(dense.frac[row].toarray()[0], want_frac[protein], rtol=1e-6)
    # Sparsified to k per vector: only the k largest signed activations of each residue remain.
    top2 = protein_activations(store, 1, topk_code(signed_neurons, 2), 64)
    want_max, _ = _brute_force(store, topk_code(signed_neurons, 2), 64)
    for row, protein in enumerate(top2.ids):
        np.testing.assert_allclose(top2.max[row].toarray()[0], want_max[protein], rtol=1e-6)
    assert (top2.frac.toarray() <= dense.frac.toarray() + 1e-6).all() and top2.max.nnz < dense.max.nnz

    ids, means = mean_vectors(store, 1, batch_rows=100)
    s = ActivationStore(store)
    arrays = {sh["name"]: np.load(p) for sh, p in zip(s.manifest["shards"], s.shard_paths(1))}
    for row, protein in enumerate(ids):
        parts = [arrays[w["shard"]][w["offset"] : w["offset"] + w["rows"]] for w in s.index() if w["id"] == protein]
        np.testing.assert_allclose(means[row], np.concatenate(parts).mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content", ["other_npz", "not_npz"])
def test_loading_another_file_names_it(tmp_path, content):
    path = tmp_path / "acts.npz"
    if content == "other_npz":
        np.savez(path, weights=np.ones(3))
    else:
        path.write_text("ids\tvalues\n")
    with pytest.raises(ValueError, match=f"{path}: .*ProteinActivations"):
        ProteinActivations.load(path)


def test_random_dictionaries_pool_like_the_family_and_reach_evaluate(trained, tmp_path, capsys):
    """pool_dense's max alone equals pooled_dense's; a random dictionary of a family's size is
    drawn in the store's space and reported by ``sae-engine evaluate --random-dictionaries``."""
    import json

    from sae_engine.cli import main
    from sae_engine.evaluation.features import pool_dense, pooled_dense
    from sae_engine.evaluation.nulls import random_dictionary, random_dictionary_in_store

    store = trained / "store"
    transform = random_dictionary(48, 32, seed=3)
    ids, maxima, frac = pool_dense(store, 1, transform, 48, batch_rows=100, fraction=False)
    assert frac is None and maxima.shape == (30, 48)
    np.testing.assert_array_equal(maxima, pooled_dense(store, 1, transform, 48, batch_rows=100).max.toarray())
    again_ids, again = random_dictionary_in_store(store, 1, 48, seed=3)
    assert again_ids == ids and np.array_equal(again, maxima)
    acts = protein_activations(store, 1, neuron_code, 32)
    acts.save(tmp_path / "neurons.npz")
    g = np.random.default_rng(5)
    (tmp_path / "labels.tsv").write_text("".join(f"{p}\tL{g.integers(3)}\n" for p in acts.ids))
    code = main(["evaluate", "--units", f"neurons={tmp_path / 'neurons.npz'}", "--fasta", str(trained / "proteins.fasta"),
                 "--annotations", str(tmp_path / "labels.tsv"), "--store", str(store), "--layer", "1",
                 "--random-dictionaries", "--max-term-share", "0.5", "--top-n", "5", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert summary["nulls"]["random_dictionary:neurons"]["units"] == 32
    assert summary["random_dictionary"]["neurons"]["units"] == 32
    assert (tmp_path / "out" / "units" / "null_random_dictionary_neurons.tsv").exists()
