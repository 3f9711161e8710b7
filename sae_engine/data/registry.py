"""Activation sources by name: what ``data.source`` may say, and how each is built.

A source is a :class:`SourceSpec`: its name, its options (a dataclass whose fields are the keys
of the ``[data.<name>]`` table), a check of those options against the whole run config (run
when the config is loaded, before any work), and a builder. Built-in sources are listed here
as ``"module:attribute"`` and imported only when used, so naming one imports nothing heavy;
other packages add theirs with :func:`register_source`. The trainer imports none of them.
This module imports nothing of the engine (config and sources import it), so a run config and
an activation source appear below as ``Any``: a :class:`~sae_engine.config.RunConfig` and a
:class:`~sae_engine.data.sources.ActivationSource`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_BUILTIN = {
    "synthetic": "sae_engine.data.sources:SYNTHETIC",
    "shards": "sae_engine.data.sources:SHARDS",
    "esm": "sae_engine.esm.sources:STORE",
    "esm_live": "sae_engine.esm.sources:LIVE",
}


@dataclass(frozen=True)
class SourceSpec:
    """A named activation source.

    ``build(options, config)`` returns vectors ``[d_in]`` for an SAE, or ``[d_in + d_out]``
    (input and target side by side) for a transcoder. ``check(options, config)`` raises
    ``ConfigError`` naming the ``data.<name>.<key>`` at fault. ``table`` names the config table
    of the options when sources share one (``esm`` and ``esm_live`` both read ``[data.esm]``).
    """

    name: str
    options: type
    build: Callable[[Any, Any], Any]  # (options, RunConfig) -> ActivationSource
    check: Callable[[Any, Any], None] | None = None  # (options, RunConfig) -> None, or raises ConfigError
    table: str | None = None

    @property
    def table_name(self) -> str:
        return self.table or self.name


_registered: dict[str, SourceSpec] = {}


class UnknownSourceError(KeyError):
    """``data.source`` names no registered source."""


def register_source(spec: SourceSpec, *, replace: bool = False) -> None:
    """Make ``spec`` available as ``data.source = spec.name``."""
    if not replace and spec.name in source_names() and get_source(spec.name) is not spec:
        raise ValueError(f"an activation source named {spec.name!r} is already registered")
    _registered[spec.name] = spec


def source_names() -> list[str]:
    """Every name ``data.source`` accepts, built-in and registered."""
    return sorted(set(_BUILTIN) | set(_registered))


def get_source(name: str) -> SourceSpec:
    """The spec registered as ``name`` (built-ins are imported on first use)."""
    if name not in _registered:
        if name not in _BUILTIN:
            raise UnknownSourceError(name)
        module, attribute = _BUILTIN[name].split(":")
        _registered[name] = getattr(importlib.import_module(module), attribute)
    return _registered[name]


def table_spec(table: str) -> SourceSpec:
    """A spec whose options are the ``[data.<table>]`` table (built-ins share their name with it)."""
    if table in source_names() and get_source(table).table_name == table:
        return get_source(table)
    for spec in _registered.values():
        if spec.table_name == table:
            return spec
    raise UnknownSourceError(table)


def build_source(config: Any) -> Any:
    """The activation source a RunConfig's ``data`` describes, built by its registered spec."""
    spec = get_source(config.data.source)
    return spec.build(config.data.options, config)
