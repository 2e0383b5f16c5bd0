"""User-facing errors: one line that says what was wrong, where, and what would be valid."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path


class Anomaly3DError(Exception):
    """Base class for errors shown to users as one line, without a traceback."""


class ConfigError(Anomaly3DError):
    """A configuration key or value is invalid."""


class PluginError(Anomaly3DError):
    """A plugin is unknown, duplicated or broken."""


class DataError(Anomaly3DError):
    """An input file cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def did_you_mean(name: str, choices: Iterable[str], what: str = "name") -> str:
    """Return '"did you mean 'x'? available: a, b"' for an unknown ``name``."""
    options = sorted(set(choices))
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown {what} '{name}'; {hint}available: {', '.join(options) or '(none)'}"
