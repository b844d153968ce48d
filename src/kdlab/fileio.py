"""One bounded reader for every file kdlab reads.

A run folder, a recipe or a dataset may come from someone else. Every file kdlab reads goes through this module:

* it must be a **regular file** — a symlink is followed, but only to a regular file; a device (``/dev/zero``), FIFO,
  socket or folder is refused before a byte is read (the file is opened non-blocking and checked with ``fstat`` on
  the open descriptor, so a FIFO never blocks and a swap between check and read is not possible);
* it must be **no larger than the limit of its kind** (:data:`LIMITS`), adjustable per kind with the environment
  variable ``KDLAB_MAX_BYTES_<KIND>`` (e.g. ``KDLAB_MAX_BYTES_METRICS=4G``; suffixes K, M, G, T are powers of 1024).

Failures are one-line :class:`~kdlab.errors.KdlabError` s (exit 2) naming the file and, for the size, the variable
that raises the limit. The readers:

* :func:`read_bytes` / :func:`read_text` / :func:`read_json`: the whole file (configs, metrics, summaries, state,
  weights); never more than the limit, even from a file that grows meanwhile;
* :func:`open_binary`: the checked descriptor as a seekable file object for libraries that stream (numpy's ``.npz``,
  tarfile, the restricted unpickler, ``torch.load``), cut at the limit the same way; :func:`sha256` hashes through it;
* :func:`check_file`: the check alone, for a file a library opens itself (safetensors memory-maps a teacher cache);
* :func:`read_tail`: the last bytes of a log, whatever its size.

:func:`limits_table` is the table of kinds in ``docs/run_folders.md`` (a test keeps them equal).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
    "json": FileKind(64 * _MIB, "summary.json, state.json, train_eval.json, analysis summaries, plan and sweep JSON"),
    "metrics": FileKind(1 * _GIB, "metrics.jsonl / metrics.csv and other per-epoch logs"),
    "text": FileKind(64 * _MIB, "other text files (worker logs, results tables)"),
    "checkpoint": FileKind(64 * _GIB, "model weights and training checkpoints (.safetensors; .pth/.pt imported weights-only)"),
    "cache": FileKind(4 * _TIB, "teacher-output caches (.safetensors)"),
    "archive": FileKind(64 * _GIB, "dataset archives and arrays (.npz, .tar.gz, CIFAR pickles, the MNIST-1D cache)"),
    "image": FileKind(256 * _MIB, "one image file (image-folder datasets, analysis figures embedded in reports)"),
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


def describe_mode(mode: int) -> str:
    """What a file that is not regular is, for messages: ``a FIFO (named pipe)``, ``a device``, ``a folder`` …"""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open_checked(
    path: Path, kind: str, what: str, error: type[KdlabError], bounded: bool = True
) -> tuple[int, int]:
    """Open ``path`` without blocking, check it is a regular file (within the limit when ``bounded``); return
    (fd, size)."""
    limit = max_bytes(kind) if bounded else 1 << 62
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder, not a regular file") from None
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is {describe_mode(st.st_mode)}, not a regular file")
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


class _BoundedRaw(io.RawIOBase):
    """A checked descriptor read through a size bound: reading past ``limit`` bytes (a file that grew after the
    check) raises instead of returning more. Seekable, so numpy, zipfile, tarfile and pickle can use it."""

    def __init__(self, fd: int, limit: int, grew: KdlabError) -> None:
        self._f = io.FileIO(fd, "rb", closefd=True)
        self._limit, self._grew = limit, grew

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        room = self._limit + 1 - self._f.tell()
        view = memoryview(buffer).cast("B")
        n = self._f.readinto(view[: max(room, 0)] if room < len(view) else view) or 0
        if self._f.tell() > self._limit:
            raise self._grew
        return n

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()
        super().close()


def open_binary(path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError) -> BinaryIO:
    """``path`` opened for reading (a regular file within the limit of ``kind``), for libraries that stream a file
    (numpy, tarfile, the restricted unpickler). Never yields more than the limit; the caller closes it."""
    path = Path(path)
    what = what or f"{kind} file"
    fd, _ = _open_checked(path, kind, what, error)
    grew = error(f"{what} {path} grew past the {human(max_bytes(kind))} limit for {kind} files while being read")
    return io.BufferedReader(_BoundedRaw(fd, max_bytes(kind), grew), buffer_size=1 << 20)  # type: ignore[return-value]


def read_json(path: str | Path, kind: str = "json", what: str | None = None, error: type[KdlabError] = KdlabError) -> Any:
    """:func:`read_text` parsed as JSON; malformed JSON is a one-line ``error`` naming the file and the line."""
    what = what or f"{kind} file"
    text = read_text(path, kind, what, error)
    try:
        return json.loads(text)
    except ValueError as err:
        line = getattr(err, "lineno", None)
        raise error(f"{what} {path} is not valid JSON" + (f" (line {line})" if line else "")) from None


def sha256(path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError) -> str:
    """SHA-256 hex digest of ``path`` (a regular file within the limit of ``kind``), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_binary(path, kind, what, error) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    grew = f"{what} {path} grew past the {human(limit)} limit for {kind} files while being read"
    try:
        with os.fdopen(fd, "rb", closefd=True) as fh:
            data = fh.read(size)  # one read of the size fstat gave (never a buffer of the limit's size)
            if not fh.read(1):
                return data
            fh.seek(len(data))  # the file grew meanwhile: read on in blocks, up to the limit
            parts, total = [data], len(data)
            while block := fh.read(min(1 << 20, limit + 1 - total)):
                parts.append(block)
                total += len(block)
                if total > limit:
                    raise error(grew)
            return b"".join(parts)
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}") from None


def read_text(
    path: str | Path, kind: str, what: str | None = None, error: type[KdlabError] = KdlabError, encoding: str = "utf-8"
) -> str:
    """:func:`read_bytes` decoded (``encoding``); undecodable bytes are a one-line ``error``."""
    data = read_bytes(path, kind, what, error)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        raise error(f"{what or kind + ' file'} {path} is not {encoding.upper()} text (byte {err.start})") from None


def read_tail(path: str | Path, kind: str, nbytes: int = 64 * _KIB, what: str | None = None,
              error: type[KdlabError] = KdlabError) -> str:
    """The last ``nbytes`` of a regular file, decoded leniently (for the end of a log; no size limit applies since
    no more than ``nbytes`` are read)."""
    path = Path(path)
    what = what or f"{kind} file"
    fd, size = _open_checked(path, kind, what, error, bounded=False)
    with os.fdopen(fd, "rb", closefd=True) as fh:
        fh.seek(max(size - nbytes, 0))
        return fh.read(nbytes).decode("utf-8", errors="replace")


def limits_table() -> str:
    """The limits as a markdown table (for docs and ``--help`` texts)."""
    rows = ["| kind | default limit | variable | files |", "|---|---|---|---|"]
    for kind, spec in LIMITS.items():
        rows.append(f"| {kind} | {human(spec.default)} | `{env_var(kind)}` | {spec.description} |")
    return "\n".join(rows)
