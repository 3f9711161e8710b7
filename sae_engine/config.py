"""Run configuration: dataclasses loadable from TOML and overridable with ``key=value`` strings.

A run config has three sections, ``[model]``, ``[data]`` and ``[train]``; see
``examples/*.toml`` for documented examples. ``[data]`` holds the generic keys; each activation
source's own settings live in its sub-table (``[data.synthetic]``, ``[data.shards]``,
``[data.esm]``), parsed into the options dataclass that the source registers
(:mod:`sae_engine.data.registry`). Every check happens before any work starts, and each failure names
the offending key and value.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .parallel_config import ParallelConfig
from .data.registry import UnknownSourceError, get_source, source_names, table_spec


KINDS = ("topk", "batchtopk", "matryoshka_topk", "matryoshka_batchtopk", "jumprelu")
BATCH_KINDS = ("batchtopk", "matryoshka_batchtopk")  # BatchTopK selection: top B*k of the batch, a threshold at inference
MATRYOSHKA_KINDS = ("matryoshka_topk", "matryoshka_batchtopk")  # nested prefixes each reconstruct the input
# The default Matryoshka prefixes: MATRYOSHKA_LEVELS nested sizes, each MATRYOSHKA_RATIO times the
# one before, ending at n_latents (n/64, n/16, n/4, n). Neither SAELens (matryoshka_widths) nor
# dictionary_learning (group_fractions) has a default; their examples and Bussmann et al. (2025)
# grow the dictionary geometrically by a small factor per level, which this follows.
MATRYOSHKA_LEVELS = 4
MATRYOSHKA_RATIO = 4


def default_prefixes(n_latents: int) -> list[int]:
    """The default Matryoshka prefix sizes for n latents: n / RATIO^j for j = LEVELS-1 .. 0,
    those below 1 or repeated dropped (so always strictly increasing, ending at n)."""
    sizes = [n_latents // MATRYOSHKA_RATIO**j for j in range(MATRYOSHKA_LEVELS - 1, -1, -1)]
    return sorted({m for m in sizes if m >= 1})


@dataclass
class ModelConfig:
    """The autoencoder: shapes, sparsity and its auxiliary losses."""

    d_in: int = 320
    n_latents: int = 10240
    k: int = 32
    # "topk" (per-row top k), "batchtopk" (top B*k over the batch), their Matryoshka versions
    # "matryoshka_topk" / "matryoshka_batchtopk" (every prefix of matryoshka_prefixes reconstructs),
    # or "jumprelu" (a learned threshold per latent and an L0 penalty; k unused)
    kind: str = "topk"
    matryoshka_prefixes: list[int] | None = None  # nested sizes m_1 < ... < m_G = n_latents; None = default_prefixes
    d_out: int | None = None  # transcoders: width of the target; None = an SAE (target = input)
    skip_connection: bool = False  # transcoders: add a learned linear map of the input
    normalize: str = "dataset"  # "dataset" (one scale to unit mean squared norm), "layernorm", "none"
    b_dec_init: str = "geometric_median"  # "geometric_median", "mean" or "zeros"
    k_aux: int | None = None  # AuxK latents; None = d_in // 2
    aux_coef: float = 1 / 32
    dead_tokens: int = 10_000_000  # a latent is dead after this many tokens without firing
    multi_topk: bool = False  # add the Multi-TopK loss at 4k (weight 1/8)
    batchtopk_row_cap: int | None = None  # candidates per row for BatchTopK; None = 4k
    jumprelu_row_cap: int | None = None  # JumpReLU: latents a row's code holds at most (more: overflow); None = 4k
    jumprelu_bandwidth: float = 0.001  # JumpReLU: width of the rectangle kernel of the threshold's pseudo-gradient
    l0_coef: float = 1e-3  # JumpReLU: weight of the L0 penalty (mean active latents per vector) beside the FVU

    @property
    def target_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None

    @property
    def aux_k(self) -> int:
        return min(self.k_aux if self.k_aux is not None else self.d_in // 2, self.n_latents)

    @property
    def row_cap(self) -> int:
        """Slots of a row's code: BatchTopK's candidates per row, or JumpReLU's cap (both default 4k)."""
        cap = self.jumprelu_row_cap if self.kind == "jumprelu" else self.batchtopk_row_cap
        return min(cap or 4 * self.k, self.n_latents)

    @property
    def batch_selection(self) -> bool:
        """Whether the code is BatchTopK's (top B*k of the batch in training, a threshold at inference)."""
        return self.kind in BATCH_KINDS

    @property
    def is_matryoshka(self) -> bool:
        return self.kind in MATRYOSHKA_KINDS

    @property
    def prefixes(self) -> list[int]:
        """The Matryoshka prefix sizes m_1 < ... < m_G = n_latents ([n_latents] for other kinds)."""
        if not self.is_matryoshka:
            return [self.n_latents]
        if self.matryoshka_prefixes is None:
            return default_prefixes(self.n_latents)
        return list(self.matryoshka_prefixes)


# Keys that [data] held before each source got its own table: old key -> new key.
MOVED_DATA_KEYS = {
    "synthetic_tokens": "data.synthetic.tokens",
    "paths": "data.shards.paths",
    "target_paths": "data.shards.target_paths",
    "store": "data.esm.store",
    "layer": "data.esm.layer",
    "target_layer": "data.esm.target_layer",
    "fasta": "data.esm.fasta",
    "max_proteins": "data.esm.max_proteins",
    "esm_model": "data.esm.model",
    "pool": "data.esm.pool",
}


@dataclass
class DataConfig:
    """Where activations come from and how they are buffered."""

    source: str = "synthetic"  # a registered source: "synthetic", "shards", "esm", "esm_live", ...
    buffer_size: int = 262_144  # vectors held by the ring buffer
    eval_tokens: int = 8192  # held out from the start of the source for evaluation
    seed: int = 0
    tables: dict[str, Any] = field(default_factory=dict)  # "[data.<name>]" -> that source's options dataclass

    @property
    def options(self) -> Any:
        """The options of ``source`` (from its table, or its defaults when the table is absent)."""
        spec = get_source(self.source)
        return self.tables.setdefault(spec.table_name, spec.options())

    def to_dict(self) -> dict[str, Any]:
        """The ``[data]`` section as TOML would hold it (generic keys, then one sub-table per source)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "tables"}
        out.update({name: dataclasses.asdict(options) for name, options in self.tables.items()})
        return copy.deepcopy(out)


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpoints."""

    backend: str = "torch"  # "torch" or "jax"
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "auto"  # "auto" (bf16 where the hardware has bf16 units, else fp32), "bf16" or "fp32"
    precision_resolved: str | None = None  # the compute dtype a run uses: set at its start, kept on resume
    batch_size: int = 4096
    max_tokens: int | None = None  # None = until the data ends
    lr: float | None = None  # None = 2e-4 / sqrt(n_latents / 16384), as Gao et al. scale it
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    decay: str = "constant"  # "constant", "linear" or "cosine" after warmup
    decay_start: float = 0.8  # fraction of training where decay begins
    grad_clip: float | None = 1.0  # global gradient norm bound; None = off
    optimizer: str = "adam"  # "adam" (dense) or "row_sparse_adam" (touched rows only)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    out_dir: str = "runs/sae"
    progress: bool = True


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model), "data": self.data.to_dict(), "train": dataclasses.asdict(self.train),
                "parallel": dataclasses.asdict(self.parallel)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "config") -> RunConfig:
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "parallel": ParallelConfig}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"{origin}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        built = {name: _data_from(dict(raw.get(name, {})), origin) if kind is DataConfig
                 else _dataclass_from(kind, dict(raw.get(name, {})), f"[{name}]", origin)
                 for name, kind in sections.items()}
        config = cls(**built)
        config.validate(origin)
        return config

    # Hand-written: the rules span sections and sources (a transcoder needs target shards); a schema library would not say them more simply.
    def validate(self, origin: str = "config") -> None:
        """Check every value, and the options of ``data.source`` with that source's own check."""
        m, d, t = self.model, self.data, self.train

        def fail(key: str, value: Any, why: str) -> None:
            raise ConfigError(f"{origin}: {key} = {value!r}: {why}")

        for key, value in (("model.d_in", m.d_in), ("model.n_latents", m.n_latents), ("model.k", m.k),
                           ("train.batch_size", t.batch_size), ("data.buffer_size", d.buffer_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(key, value, "must be a positive integer")
        for key, value, why in self.parallel.problems():
            fail(key, value, why)
        if self.parallel.latent >= 1 and (why := self.parallel.check_latents(m.n_latents)):
            fail("parallel.latent", self.parallel.latent, f"{why} (model.n_latents = {m.n_latents})")
        if m.k > m.n_latents:
            fail("model.k", m.k, f"must not exceed model.n_latents = {m.n_latents}")
        if m.d_out is not None and m.d_out < 1:
            fail("model.d_out", m.d_out, "must be a positive integer or absent")
        if m.skip_connection and not m.is_transcoder:
            fail("model.skip_connection", True, "needs a transcoder (set model.d_out)")
        if m.multi_topk and m.kind != "topk":
            fail("model.multi_topk", True, "is defined for model.kind = 'topk' (a fixed k per row); "
                 "BatchTopK's L0 is set by its learned threshold at inference, and Matryoshka SAEs have their own nested losses")
        if m.matryoshka_prefixes is not None:
            if not m.is_matryoshka:
                fail("model.matryoshka_prefixes", m.matryoshka_prefixes, f"needs a Matryoshka model.kind {list(MATRYOSHKA_KINDS)}")
            if why := _prefix_problem(m.matryoshka_prefixes, m.n_latents):
                fail("model.matryoshka_prefixes", m.matryoshka_prefixes, why)
        if m.batchtopk_row_cap is not None and not (isinstance(m.batchtopk_row_cap, int) and m.batchtopk_row_cap >= m.k):
            fail("model.batchtopk_row_cap", m.batchtopk_row_cap, f"must be an integer >= model.k = {m.k}, or absent")
        if m.jumprelu_row_cap is not None and not (isinstance(m.jumprelu_row_cap, int) and m.jumprelu_row_cap >= 1):
            fail("model.jumprelu_row_cap", m.jumprelu_row_cap, "must be a positive integer, or absent")
        if not (isinstance(m.jumprelu_bandwidth, (int, float)) and m.jumprelu_bandwidth > 0):
            fail("model.jumprelu_bandwidth", m.jumprelu_bandwidth, "must be positive")
        if not (isinstance(m.l0_coef, (int, float)) and m.l0_coef >= 0):
            fail("model.l0_coef", m.l0_coef, "must be >= 0")
        if m.k_aux is not None and not (isinstance(m.k_aux, int) and m.k_aux >= 1):
            fail("model.k_aux", m.k_aux, "must be a positive integer or absent")
        choices = {
            "model.kind": (m.kind, KINDS),
            "model.normalize": (m.normalize, ("dataset", "layernorm", "none")),
            "model.b_dec_init": (m.b_dec_init, ("geometric_median", "mean", "zeros")),
            "data.source": (d.source, source_names()),
            "train.backend": (t.backend, ("torch", "jax")),
            "train.device": (t.device, ("auto", "cpu", "cuda")),
            "train.precision": (t.precision, ("auto", "bf16", "fp32")),
            "train.precision_resolved": (t.precision_resolved, (None, "bf16", "fp32")),
            "train.decay": (t.decay, ("constant", "linear", "cosine")),
            "train.optimizer": (t.optimizer, ("adam", "row_sparse_adam")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                fail(key, value, f"must be one of {list(allowed)}")
        if d.eval_tokens < 0:
            fail("data.eval_tokens", d.eval_tokens, "must be >= 0")
        if d.buffer_size < 2 * t.batch_size:
            fail("data.buffer_size", d.buffer_size, f"must hold at least two batches (2 x {t.batch_size})")
        if t.lr is not None and not t.lr > 0:
            fail("train.lr", t.lr, "must be positive")
        if t.grad_clip is not None and not t.grad_clip > 0:
            fail("train.grad_clip", t.grad_clip, "must be positive or absent")
        if not 0 <= t.decay_start <= 1:
            fail("train.decay_start", t.decay_start, "must be in [0, 1]")
        spec = get_source(d.source)
        if spec.check is not None:
            try:
                spec.check(d.options, self)
            except ConfigError as error:
                raise ConfigError(f"{origin}: {error}") from None

    @property
    def learning_rate(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 2e-4 / (self.model.n_latents / 2**14) ** 0.5


def _prefix_problem(prefixes: Any, n_latents: int) -> str | None:
    """Why ``prefixes`` cannot be Matryoshka prefix sizes of n_latents latents (None: they can)."""
    if not isinstance(prefixes, list) or not prefixes or any(
            not isinstance(m, int) or isinstance(m, bool) for m in prefixes):
        return "must be a non-empty list of integers"
    if prefixes[0] < 1:
        return "must be positive"
    if any(b <= a for a, b in zip(prefixes, prefixes[1:])):
        return "must be strictly increasing"
    if prefixes[-1] != n_latents:
        return f"must end at model.n_latents = {n_latents}"
    return None


def _dataclass_from(kind: type, values: dict[str, Any], table: str, origin: str) -> Any:
    """``kind(**values)``, refusing keys ``kind`` does not have with one message naming ``table``."""
    known = {f.name for f in dataclasses.fields(kind)}
    extra = set(values) - known
    if extra:
        raise ConfigError(f"{origin}: unknown key(s) {sorted(extra)} in {table}; known: {sorted(known)}")
    return kind(**values)


def _data_from(values: dict[str, Any], origin: str) -> DataConfig:
    """``[data]``: its generic keys, then each ``[data.<name>]`` table parsed into the options of
    the source that reads it; flat keys of the old layout are refused with their new names."""
    tables = {key: values.pop(key) for key in list(values) if isinstance(values[key], dict)}
    moved = [key for key in values if key in MOVED_DATA_KEYS]
    if moved:
        raise ConfigError(f"{origin}: " + "; ".join(f"data.{key} is now {MOVED_DATA_KEYS[key]}" for key in moved)
                          + " (each source's settings live in its [data.<source>] table)")
    data = _dataclass_from(DataConfig, values, "[data]", origin)
    for table, options in tables.items():
        try:
            spec = table_spec(table)
        except UnknownSourceError:
            raise ConfigError(f"{origin}: [data.{table}]: no activation source reads this table; "
                              f"sources: {source_names()}") from None
        data.tables[table] = _dataclass_from(spec.options, options, f"[data.{table}]", origin)
    return data


def _parse_value(text: str) -> Any:
    """A ``--set`` value as TOML would read it; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (``section.table.key=value`` inside a sub-table, e.g.
    ``data.esm.layer=3``) to a raw config dict (returns a new dict)."""
    merged = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
        key, text = item.split("=", 1)
        *path, name = key.strip().split(".")
        table = merged
        for part in path:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path)} is a value, not a table")
        table[name] = _parse_value(text.strip())
    return merged


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (or the defaults when path is None) and apply overrides."""
    raw: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from error
    return RunConfig.from_dict(apply_overrides(raw, overrides or []), origin)
