"""The error every layer raises for a config value that cannot work (the run config re-exports it)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work, with the key and the value in the message."""
