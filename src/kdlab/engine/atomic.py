"""Crash-safe file writes: write to a temporary file in the same folder, fsync, then rename over the target.

The written file gets the permissions a plain ``open()`` would give (``0666`` less the umask), not ``mkstemp``'s 0600.

Temporary files are named ``.NAME.XXXXXXXX.tmp`` (``XXXXXXXX``: ``mkstemp``'s eight random characters) and are
``flock``-ed by their writer for as long as it lives. A process killed outright (SIGKILL, out of memory) leaves its
temporary behind; :func:`remove_stale_temps_of` removes those of one target — only names of exactly that pattern,
only regular files, and only when no live writer holds the lock, so concurrent writers of the same target never
lose each other's temporaries (the writer checks, once it holds the lock, that its file was not removed in the
instant between creating and locking it, and starts a new one if it was).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from kdlab.errors import WriteError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no locks, stale temporaries are left alone
    fcntl = None  # type: ignore[assignment]

#: the random part ``mkstemp`` puts between prefix and suffix
_RANDOM = r"[a-z0-9_]{8}"


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


def temp_pattern(name: str) -> re.Pattern[str]:
    """The names of kdlab's temporary files for a target named ``name``: ``.NAME.XXXXXXXX.tmp``."""
    return re.compile(rf"\.{re.escape(name)}\.{_RANDOM}\.tmp")


#: any kdlab temporary file (``.NAME.XXXXXXXX.tmp``), whatever its target
ANY_TEMP = re.compile(rf"\..+\.{_RANDOM}\.tmp")


def new_temp(path: Path) -> tuple[int, str]:
    """Create and ``flock`` a temporary file for ``path`` in its folder; returns ``(fd, name)``.

    The lock marks the file as live for :func:`remove_stale_temps_of`; a file removed by such a cleaner between its
    creation and the lock (no link left once locked) is replaced by a new one."""
    while True:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if fcntl is None:
            return fd, tmp
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, tmp
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)  # a cleaner took it for a dead writer's: start again


def remove_if_dead(path: Path) -> bool:
    """Remove the temporary file ``path`` unless a live writer holds its lock (regular files only, never followed
    through a symlink); True when removed."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # gone meanwhile, a symlink, or not ours to open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer
        try:
            now = os.lstat(path)
        except OSError:
            return False
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False  # replaced by another file meanwhile
        os.unlink(path)  # while holding the lock: a writer that locks it afterwards sees no link and starts anew
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_temps_of(path: str | Path) -> list[Path]:
    """Remove the temporaries killed writers of ``path`` left next to it (``.NAME.XXXXXXXX.tmp``, no live writer)."""
    path = Path(path)
    pattern = temp_pattern(path.name)
    try:
        names = [e.name for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    return [path.parent / n for n in names if remove_if_dead(path.parent / n)]


def atomic_write_bytes(path: str | Path, data: bytes, output: bool = False) -> str:
    """Atomically replace ``path`` with ``data``; returns the SHA-256 hex digest of what was written.

    On any failure (e.g. a full disk) the temporary file is removed, the old ``path`` is left as it was and a
    one-line :class:`~kdlab.errors.WriteError` is raised. ``output``: a file the user named (checked beforehand
    with :func:`kdlab.errors.check_output_file`): missing folders on the way are created and the temporaries that
    killed writers of it left are removed (files in a run folder get that from the folder's lock instead).
    """
    path = Path(path)
    tmp = None
    try:
        if output:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps_of(path)
        fd, tmp = new_temp(path)
        with os.fdopen(fd, "wb") as f:
            chmod_like_open(f.fileno())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # still locked: a cleaner never takes a temporary about to be renamed for stale
            tmp = None
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


def atomic_write_text(path: str | Path, text: str, output: bool = False) -> str:
    return atomic_write_bytes(path, text.encode(), output)


def sha256_file(path: str | Path, kind: str = "checkpoint") -> str:
    """SHA-256 of a file read through :mod:`kdlab.fileio` (a regular file within the limit of ``kind``)."""
    from kdlab.fileio import sha256

    return sha256(path, kind)
