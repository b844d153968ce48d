"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename over the target.

The written file gets the permissions a plain ``open()`` would give (``0666`` less the umask), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from kdlab.errors import WriteError


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_open(fd: int) -> None:
    """Give a ``mkstemp`` file (0600) the permissions ``open()`` would: ``0666`` less the umask."""
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o666 & ~current_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> str:
    """Atomically replace ``path`` with ``data``; returns the SHA-256 hex digest of what was written.

    On any failure (e.g. a full disk) the temporary file is removed, the old ``path`` is left as it was and a
    one-line :class:`~kdlab.errors.WriteError` is raised.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            chmod_like_open(f.fileno())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(err, OSError):
            kept = "; the previous version is intact" if path.exists() else ""  # say so only when there is one
            raise WriteError(f"could not write {path}: {err.strerror or err}{kept}") from None
        raise
    fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def atomic_write_text(path: str | Path, text: str) -> str:
    return atomic_write_bytes(path, text.encode())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
