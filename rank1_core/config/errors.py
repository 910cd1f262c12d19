"""The error every config check raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value is wrong. The message names which."""
