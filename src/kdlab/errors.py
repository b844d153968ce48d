"""User-facing errors.

Anything the user can fix (a config, a path, a checkpoint, a CLI argument) raises :class:`KdlabError`. The CLI prints
its message as one line and exits with code 2; nothing on disk is touched before the input has been validated.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdlabError(Exception):
    """An error caused by user input. ``str(err)`` is a single line that names the problem."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(KdlabError):
    """Invalid config file, override or value."""


class DataError(KdlabError):
    """Missing, empty or malformed data."""


class CheckpointError(KdlabError):
    """A checkpoint that is missing, corrupted or does not fit the model."""


class WriteError(KdlabError):
    """Writing results failed (disk full, permissions); what was there before is left intact."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> KdlabError:
    """A uniform error for an unknown registry name."""
    choices = sorted(choices)
    return ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose from: {', '.join(choices)}")
