"""The study file: one TOML file that names a whole experiment (see ``examples/study_*.toml``).

Tables: top-level keys (``out_dir``, ``seed``, ``data_dir``), ``[corpus]`` (the training
proteins and the data-scale points), ``[evaluation]`` (the proteome the SAEs are judged on, and
the concept sets), ``[esm]`` (model, layers, how activations are made) and one ``[[variant]]``
per SAE kind. Every key is checked when the file is read, before any work; a bad one is one
error naming the file, the key and the value.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEVELS = ("residue", "protein")
KINDS = ("topk", "batchtopk")
CORPORA = ("swissprot", "fasta")
CONCEPTS = ("go", "pfam")
ESM_SOURCES = ("store", "esm_live")


class StudyConfigError(ValueError):
    """A study file that cannot work; the message names the file, the key and the value."""


@dataclass
class CorpusConfig:
    """``[corpus]``: the training proteins. Scales are nested: scale N trains on the first N
    proteins of one seeded order, so every smaller corpus is a prefix of the larger ones."""

    source: str = "swissprot"  # "swissprot": the prepared Swiss-Prot; "fasta": the file below
    fasta: str = ""  # source = "fasta": any FASTA (UniRef50, ...); "~" expands
    min_length: int = 50
    max_length: int = 1000
    scales: list[int] = field(default_factory=lambda: [1000, 4000, 16000])


@dataclass
class EvaluationConfig:
    """``[evaluation]``: the proteins the SAEs are judged on (never trained on) and how."""

    fasta: str = ""  # default: the prepared human.fasta
    min_length: int = 50
    max_length: int = 1000
    max_proteins: int | None = None  # None: every protein in range; N: a seeded sample (small studies)
    concepts: list[str] = field(default_factory=lambda: ["go", "pfam"])
    go_annotations: str = ""  # default: the prepared go_annotations.tsv (or a GAF)
    ontology: str = ""  # default: the prepared go.sqlite (or an OBO file)
    pfam: str = ""  # default: the prepared human_pfam.tsv (any accession<TAB>label table)
    top_n: int = 50  # study set size of each unit
    max_term_share: float = 0.06  # concepts cover at most this share of the background (raise it for tiny studies)
    random_subset_draws: int = 5  # matched counts by random subsets of the larger family
    seed: int = 0  # split and nulls


@dataclass
class EsmConfig:
    """``[esm]``: the model, the layers, and how activations reach training."""

    model: str = "default"  # a model spec (see sae_engine.esm.models): "default" = the prepared ESM2-8M
    layers: list[int] = field(default_factory=lambda: [4])
    precision: str = "auto"  # "auto", "bf16" or "fp32" (ESM2's and the SAEs' matrix products)
    store_dtype: str = "float16"  # activation stores on disk: float16 halves them
    max_tokens: int = 4096  # padded positions per ESM2 batch
    source: str = "store"  # "store": extract each corpus increment once; "esm_live": train through ESM2 live
    device: str = "auto"  # training device ("auto", "cpu", "cuda")


@dataclass
class VariantConfig:
    """``[[variant]]``: one kind of SAE, trained at every scale and layer."""

    name: str = ""
    level: str = "residue"  # "residue" (one vector per residue) or "protein" (mean-pooled per protein)
    kind: str = "topk"  # "topk" or "batchtopk"
    n_latents: int = 4096
    k: int = 32
    batch_size: int = 4096
    lr: float | None = None  # None: the trainer's width-scaled default
    min_tokens: int = 0  # train on at least this many vectors: a small corpus is repeated (store source only)
    eval_tokens: int = 8192  # vectors held out from the start of the corpus for the FVU
    buffer_size: int = 262144
    dead_tokens: int | None = None  # None: the trainer's default
    scales: list[int] | None = None  # None: every corpus scale
    layers: list[int] | None = None  # None: every esm layer
    set: list[str] = field(default_factory=list)  # further run-config overrides, e.g. "train.warmup_steps=50"


@dataclass
class StudyConfig:
    """A whole study; see the module docstring. ``path`` is the file it was read from."""

    out_dir: str = "runs/study"
    seed: int = 0  # corpus order
    data_dir: str = ""  # prepared data folder; "" = the default (sae-engine data prepare)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    esm: EsmConfig = field(default_factory=EsmConfig)
    variant: list[VariantConfig] = field(default_factory=list)
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("path")
        return out

    def points(self) -> list[tuple[VariantConfig, int, int]]:
        """Every (variant, scale, layer) to train, smallest scale first within each variant."""
        return [(v, scale, layer) for v in self.variant for layer in (v.layers or self.esm.layers)
                for scale in sorted(v.scales or self.corpus.scales)]


def _check_type(value: Any, hint: Any, where: str) -> Any:
    """``value`` converted to ``hint`` (int -> float allowed), or StudyConfigError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)][0]
        return _check_type(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise StudyConfigError(f"{where} = {value!r}: expected a list")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise StudyConfigError(f"{where} = {value!r}: expected {hint.__name__}")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """A dataclass from a TOML table: unknown keys and wrong types are errors naming the key."""
    if not isinstance(table, dict):
        raise StudyConfigError(f"{where}: expected a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"path"}
    unknown = sorted(set(table) - names)
    if unknown:
        at = f"{where}.{unknown[0]}" if where else unknown[0]
        raise StudyConfigError(f"{at}: unknown key (known: {', '.join(sorted(names))})")
    values = {}
    for key, value in table.items():
        hint, at = hints[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, at)
        elif key == "variant":
            if not isinstance(value, list):
                raise StudyConfigError(f"{where}.variant: expected [[variant]] tables")
            values[key] = [_build(VariantConfig, v, f"variant[{i}]") for i, v in enumerate(value)]
        else:
            values[key] = _check_type(value, hint, at)
    return cls(**values)


def _validate(c: StudyConfig) -> None:
    def fail(key: str, value: Any, why: str) -> None:
        raise StudyConfigError(f"{key} = {value!r}: {why}")

    def positive_sorted(key: str, values: list[int]) -> None:
        if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
            fail(key, values, "must be distinct positive integers")

    if c.corpus.source not in CORPORA:
        fail("corpus.source", c.corpus.source, f"must be one of {list(CORPORA)}")
    if c.corpus.source == "fasta" and not c.corpus.fasta:
        fail("corpus.fasta", c.corpus.fasta, "corpus.source = 'fasta' needs a FASTA file")
    for key, table in (("corpus", c.corpus), ("evaluation", c.evaluation)):
        if not 1 <= table.min_length <= table.max_length:
            fail(f"{key}.min_length", table.min_length, f"must be between 1 and {key}.max_length = {table.max_length}")
    positive_sorted("corpus.scales", c.corpus.scales)
    if c.evaluation.max_proteins is not None and c.evaluation.max_proteins < 20:
        fail("evaluation.max_proteins", c.evaluation.max_proteins, "must be at least 20 or absent (every protein)")
    for name in c.evaluation.concepts:
        if name not in CONCEPTS:
            fail("evaluation.concepts", c.evaluation.concepts, f"each must be one of {list(CONCEPTS)}")
    if not c.evaluation.concepts or len(set(c.evaluation.concepts)) != len(c.evaluation.concepts):
        fail("evaluation.concepts", c.evaluation.concepts, "must name distinct concept sets")
    if c.evaluation.top_n < 1:
        fail("evaluation.top_n", c.evaluation.top_n, "must be >= 1")
    if not 0 < c.evaluation.max_term_share <= 1:
        fail("evaluation.max_term_share", c.evaluation.max_term_share, "must be in (0, 1]")
    if c.evaluation.random_subset_draws < 1:
        fail("evaluation.random_subset_draws", c.evaluation.random_subset_draws, "must be >= 1")
    if c.esm.precision not in ("auto", "bf16", "fp32"):
        fail("esm.precision", c.esm.precision, "must be one of ['auto', 'bf16', 'fp32']")
    if c.esm.store_dtype not in ("float16", "float32"):
        fail("esm.store_dtype", c.esm.store_dtype, "must be 'float16' or 'float32'")
    if c.esm.source not in ESM_SOURCES:
        fail("esm.source", c.esm.source, f"must be one of {list(ESM_SOURCES)}")
    if not c.esm.layers or min(c.esm.layers) < 0 or len(set(c.esm.layers)) != len(c.esm.layers):
        fail("esm.layers", c.esm.layers, "must be distinct layer numbers >= 0")
    if not c.variant:
        raise StudyConfigError("no [[variant]] table: a study trains at least one kind of SAE")
    names = [v.name for v in c.variant]
    for i, v in enumerate(c.variant):
        key = f"variant[{i}]"
        if not v.name or not all(ch.isalnum() or ch in "-_." for ch in v.name):
            fail(f"{key}.name", v.name, "needs a name of letters, digits, '-', '_' and '.'")
        if names.count(v.name) > 1:
            fail(f"{key}.name", v.name, "is used by another variant")
        if v.level not in LEVELS:
            fail(f"{key}.level", v.level, f"must be one of {list(LEVELS)}")
        if v.kind not in KINDS:
            fail(f"{key}.kind", v.kind, f"must be one of {list(KINDS)}")
        if not 1 <= v.k <= v.n_latents:
            fail(f"{key}.k", v.k, f"must be between 1 and n_latents = {v.n_latents}")
        for name in ("batch_size", "eval_tokens", "buffer_size"):
            if getattr(v, name) < 1:
                fail(f"{key}.{name}", getattr(v, name), "must be >= 1")
        if v.min_tokens < 0:
            fail(f"{key}.min_tokens", v.min_tokens, "must be >= 0")
        if v.scales is not None:
            positive_sorted(f"{key}.scales", v.scales)
            extra = sorted(set(v.scales) - set(c.corpus.scales))
            if extra:
                fail(f"{key}.scales", v.scales, f"{extra} not in corpus.scales = {c.corpus.scales}")
        if v.layers is not None and (not v.layers or set(v.layers) - set(c.esm.layers)):
            fail(f"{key}.layers", v.layers, f"must be a non-empty subset of esm.layers = {c.esm.layers}")
        if c.esm.source == "esm_live" and v.min_tokens:
            fail(f"{key}.min_tokens", v.min_tokens, "repeating a corpus needs esm.source = 'store' (esm_live reads it once)")


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file (see the module docstring)."""
    path = Path(path)
    try:
        table = tomllib.loads(path.read_text())
    except FileNotFoundError as error:
        raise StudyConfigError(f"{path}: no such study file") from error
    except tomllib.TOMLDecodeError as error:
        raise StudyConfigError(f"{path}: not valid TOML: {error}") from error
    try:
        config = _build(StudyConfig, table, "")
        _validate(config)
    except StudyConfigError as error:
        raise StudyConfigError(f"{path}: {error}") from error
    config.path = str(path)
    return config
