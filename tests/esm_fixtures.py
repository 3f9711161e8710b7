"""Small real ESM2 models written as Hugging Face checkpoints, for the tests that load them."""
from __future__ import annotations

import json
from pathlib import Path

from esm.model.esm2 import ESM2

from sae_engine.esm.models import to_hf_state_dict


def save_hf_esm2(model: ESM2, directory: str | Path, *, with_lm_head: bool = True, name: str = "random-esm2") -> Path:
    """Write ``model`` as a Hugging Face ESM2 checkpoint directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = to_hf_state_dict(model)
    if not with_lm_head:
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    config = {
        "_name_or_path": name,
        "architectures": ["EsmForMaskedLM" if with_lm_head else "EsmModel"],
        "model_type": "esm",
        "hidden_size": model.embed_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.attention_heads,
        "intermediate_size": 4 * model.embed_dim,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "position_embedding_type": "rotary",
        "emb_layer_norm_before": False,
        "token_dropout": model.token_dropout,
        "vocab_size": model.alphabet_size,
        "pad_token_id": model.padding_idx,
        "mask_token_id": model.mask_idx,
        "max_position_embeddings": 1026,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return directory
