"""User-facing errors.

Anything the user can fix (a config, a path, a checkpoint, a CLI argument) raises :class:`KdlabError`. The CLI prints
its message as one line and exits with code 2; nothing on disk is touched before the input has been validated.
An ``OSError`` that escapes a command (read-only file system, disk full, permissions) is also shown as one line with
exit code 2 (:func:`describe_os_error`); any other exception is an internal error: one line, exit code 1 and a hint
to rerun with ``--debug`` for the traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable
from pathlib import Path


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


class UsageError(KdlabError):
    """A malformed command line (missing or unknown arguments)."""


def describe_os_error(err: OSError) -> str:
    """One line for an ``OSError``: the reason and the path(s) it concerns."""
    what = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{what}: {' -> '.join(paths)}" if paths else what


def require_file(path: str | Path, what: str, error: type[KdlabError] = KdlabError, kind: str = "text") -> Path:
    """``path`` if it is a regular file within the size limit of ``kind``: :func:`kdlab.fileio.check_file`."""
    from kdlab.fileio import check_file  # kdlab.fileio imports this module

    return check_file(path, kind, what, error)


def warn(message: str) -> None:
    """One ``kdlab: warning: …`` line on stderr: shown with ``--quiet`` too (quiet silences progress, not problems)."""
    print(f"kdlab: warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return `` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> KdlabError:
    """A uniform error for an unknown registry name."""
    choices = sorted(choices)
    return ConfigError(f"unknown {kind} '{name}'{did_you_mean(name, choices)}; choose from: {', '.join(choices)}")


def _writable_ancestor(path: Path) -> None:
    """The nearest existing folder on the way to ``path`` must be a writable folder (one-line error otherwise)."""
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise KdlabError(f"cannot write {path}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KdlabError(f"cannot write {path}: {folder} is not writable")


def check_output_file(path: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """Before any work is done: ``path`` can be written as a file (not a folder, not below a file, in a writable
    folder; an existing file only with ``--overwrite``). Folders on the way that do not exist yet are created by the
    writer when it writes (:func:`kdlab.engine.atomic.atomic_write_bytes` with ``output=True``)."""
    path = Path(path)
    if path.is_dir():
        raise KdlabError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise KdlabError(f"{path} already exists; pass --overwrite to replace it")
    _writable_ancestor(path)
    return path


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Before any work is done: ``path`` can be created as a new folder (it may exist as an empty one)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise KdlabError(f"{flag} {path} already exists and is not an empty folder; choose another {flag}")
    _writable_ancestor(path)
    return path
