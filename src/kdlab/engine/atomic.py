"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename over the target."""

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
            raise WriteError(f"could not write {path}: {err.strerror or err}; the previous version is intact") from None
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
