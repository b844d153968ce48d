"""One bounded reader for every file kdlab reads.

A run folder, a recipe or a dataset may come from someone else. Every file kdlab reads goes through this module:

* it must be a **regular file** — a symlink is followed, but only to a regular file; a device (``/dev/zero``), FIFO,
  socket or folder is refused before a byte is read (the file is opened non-blocking and checked with ``fstat`` on
  the open descriptor, so a FIFO never blocks and a swap between check and read is not possible);
* it must be **no larger than the limit of its kind** (:data:`LIMITS`), adjustable per kind with the environment
  variable ``KDLAB_MAX_BYTES_<KIND>`` (e.g. ``KDLAB_MAX_BYTES_METRICS=4G``; suffixes K, M, G, T are powers of 1024).

Failures are one-line :class:`~kdlab.errors.KdlabError` s (exit 2) naming the file and, for the size, the variable
that raises the limit. Large binary files (checkpoints, teacher caches, archives) are checked with
:func:`check_file` and then handed to their library (safetensors memory-maps them); small text files are read whole
with :func:`read_text` / :func:`read_bytes`, which never read past the limit even if the file grows meanwhile.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from kdlab.errors import KdlabError

_KIB, _MIB, _GIB, _TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass(frozen=True)
class FileKind:
    """A kind of file kdlab reads, with its default size limit."""

    default: int
    description: str


#: Default size limits per kind of file; ``KDLAB_MAX_BYTES_<KIND>`` (upper case) overrides one.
LIMITS: dict[str, FileKind] = {
    "config": FileKind(16 * _MIB, "YAML recipes and a run's config.yaml"),
    "json": FileKind(64 * _MIB, "summary.json, state.json, plan and sweep JSON files"),
    "metrics": FileKind(1 * _GIB, "metrics.jsonl / metrics.csv and other per-epoch logs"),
    "text": FileKind(64 * _MIB, "other text files (logs, lists of URLs, HTML templates)"),
    "checkpoint": FileKind(64 * _GIB, "model weights and training checkpoints (.safetensors, imported .pth)"),
    "cache": FileKind(4 * _TIB, "teacher-output caches (.safetensors)"),
    "archive": FileKind(64 * _GIB, "dataset archives and arrays (.npz, .tar.gz, CIFAR pickles, shards)"),
    "image": FileKind(256 * _MIB, "one image file of an image-folder dataset"),
}

_ENV_PREFIX = "KDLAB_MAX_BYTES_"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": _KIB, "M": _MIB, "G": _GIB, "T": _TIB}


def env_var(kind: str) -> str:
    """The environment variable that overrides the limit of ``kind`` (``KDLAB_MAX_BYTES_METRICS``)."""
    return _ENV_PREFIX + kind.upper()


def parse_size(text: str, what: str) -> int:
    """``"64M"`` → 67108864 (K, M, G, T are powers of 1024; a plain number is bytes)."""
    match = _SIZE.match(text)
    if not match:
        raise KdlabError(f"{what} must be a size such as 512M or 4G, got '{text}'")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def max_bytes(kind: str) -> int:
    """The size limit of ``kind``: ``KDLAB_MAX_BYTES_<KIND>`` if set, else the default in :data:`LIMITS`."""
    if kind not in LIMITS:
        raise KeyError(f"unknown file kind '{kind}'")
    text = os.environ.get(env_var(kind), "").strip()
    return parse_size(text, env_var(kind)) if text else LIMITS[kind].default


def human(n: int) -> str:
    """A byte count for messages: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _describe_mode(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_checked(path: Path, kind: str, what: str, error: type[KdlabError]) -> tuple[int, int]:
    """Open ``path`` without blocking, check it is a regular file within the limit; return (fd, size)."""
    limit = max_bytes(kind)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a file") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {_describe_mode(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise error(
                f"{what} {path} is {human(st.st_size)}, over the {human(limit)} limit for {kind} files "
                f"(raise it with {env_var(kind)}=SIZE)"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def check_file(path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError) -> Path:
    """``path`` if it is a regular file (symlinks followed) no larger than the limit of ``kind``; else ``error``.

    For files handed to a library afterwards (safetensors, numpy, tarfile, Pillow)."""
    path = Path(path)
    fd, _ = _open_checked(path, kind, what or f"{kind} file", error)
    os.close(fd)
    return path


def read_bytes(path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError) -> bytes:
    """The whole content of ``path`` (a regular file within the limit of ``kind``), never more than the limit."""
    path = Path(path)
    what = what or f"{kind} file"
    fd, size = _open_checked(path, kind, what, error)
    limit = max_bytes(kind)
    try:
        with os.fdopen(fd, "rb", closefd=True) as fh:
            data = fh.read(limit + 1)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    if len(data) > limit:
        raise error(f"{what} {path} grew past the {human(limit)} limit for {kind} files while being read")
    return data


def read_text(
    path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError, encoding: str = "utf-8"
) -> str:
    """:func:`read_bytes` decoded (``encoding``); undecodable bytes are a one-line ``error``."""
    data = read_bytes(path, kind, what, error)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise error(f"{what or kind + ' file'} {path} is not {encoding} text (byte {err.start})") from None


def limits_table() -> str:
    """The limits as a markdown table (for docs and ``--help`` texts)."""
    rows = ["| kind | default limit | variable | files |", "|---|---|---|---|"]
    for kind, spec in LIMITS.items():
        rows.append(f"| {kind} | {human(spec.default)} | `{env_var(kind)}` | {spec.description} |")
    return "\n".join(rows)
