"""Run directories: what a run writes and the rules that keep existing work safe.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and ``metrics.csv`` (one row per
epoch), ``checkpoints/`` (resumable state), ``best.safetensors`` / ``model.safetensors`` (best and final weights) and
``summary.json``. An existing run is never overwritten unless ``--overwrite`` is given, ``--overwrite`` removes only
these files, and a non-empty folder that is not a kdlab run is never touched.

One process writes a folder at a time: every command that writes one holds :class:`FolderLock` (``flock`` on
``FOLDER/.kdlab.lock``) from before its checks until it ends; a second one gets a one-line error. Holding the lock,
a writer first removes the temporary files and folders that killed writers left behind (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from kdlab.engine.atomic import ANY_TEMP, atomic_write_text, remove_if_dead
from kdlab.errors import KdlabError, WriteError
from kdlab.fileio import read_text

RUN_FILES = (
    "config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors", "best.safetensors",
    "train_eval.json",
)  # fmt: skip
RUN_DIRS = ("checkpoints", "analysis", "tensorboard", "wandb")  # the last two: kdlab.engine.trackers.TRACKER_DIRS
LOCK_NAME = ".kdlab.lock"
PLAN_LOCK = ".kdlab-pipeline.lock"  # held by the process working on a sweep/chain plan folder
#: files that hold a folder's lock, not results (an otherwise empty folder holding one counts as empty)
LOCK_FILES = (LOCK_NAME, PLAN_LOCK)


def open_lock_file(path: Path, create: bool = True) -> Any:
    """Open (creating it unless ``create`` is false) the lock file ``path`` for reading and writing — never through
    a symlink, and only a regular file: a lock file planted as a link to one of your files, a FIFO or a device is
    refused, not truncated. Every ``flock``-ed file of kdlab (run folders, plans, caches, studies) opens here."""
    flags = os.O_RDWR | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o666)
    except OSError:
        if os.path.islink(path):
            raise KdlabError(f"lock file {path} is a symbolic link; remove it (kdlab's lock is a plain file)") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise KdlabError(f"lock file {path} is not a regular file; remove it (kdlab's lock is a plain file)")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "r+", errors="replace")


@contextlib.contextmanager
def waiting_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the lock file ``path`` (opened by :func:`open_lock_file`), waiting for it.
    Like the run-folder lock it dies with its holder: a process killed while holding it never blocks the others."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock
        yield
        return
    with open_lock_file(path) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


class FolderBusyError(KdlabError):
    """Another process is writing to the folder."""


class FolderLock:
    """An exclusive, non-blocking lock on a folder: one writer per run folder (also a context manager).

    The folder is created when missing; if the holder fails before writing anything else into a folder it created,
    :meth:`release` removes the folder again, so a failed start leaves nothing behind. The lock file stays (removing
    it would let two processes hold locks on different files of the same name).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._file: Any = None
        self._created: Path | None = None

    def acquire(self) -> FolderLock:
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise KdlabError(f"output path {folder} exists and is not a folder")
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open_lock_file(folder / LOCK_NAME)
        except OSError as err:
            self._remove_created(missing[-1] if missing else None)
            raise WriteError(f"cannot write in {folder}: {err.strerror or err}") from None
        except KdlabError:
            self._remove_created(missing[-1] if missing else None)
            raise
        self._created = missing[-1] if missing else None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no lock
            self._file = f
            return self
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read(32).strip()
            f.close()
            who = f"another kdlab process (pid {pid})" if pid.isdigit() else "another kdlab process"
            raise FolderBusyError(f"{who} is writing to {folder}; wait for it to finish or stop it") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as err:  # disk full at the very first write: one line, and no half folder left behind
            with contextlib.suppress(OSError):
                f.close()
            self._remove_created(self._created)
            raise WriteError(f"cannot write in {folder}: {err.strerror or err}") from None
        self._file = f
        return self

    def release(self, failed: bool = False) -> None:
        """Unlock; after a failed start, remove the folder if this lock created it and nothing else was written."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if failed:
            self._remove_created(self._created)

    def _remove_created(self, top: Path | None) -> None:
        if top is None:
            return
        folder = self.folder
        if folder.is_dir() and all(p.name in LOCK_FILES for p in folder.iterdir()):
            for p in folder.iterdir():
                p.unlink(missing_ok=True)
            for p in [folder, *folder.parents]:
                try:
                    p.rmdir()
                except OSError:
                    break
                if p == top:
                    break

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release(failed=kind is not None)


#: a folder's launch records (kdlab.launch: the job that runs it, its log); not results either
LAUNCH_RECORDS = ".kdlab-launch"


def entries(path: Path) -> list[Path]:
    """What a folder holds, not counting lock files and launch records."""
    return [p for p in path.iterdir() if p.name not in LOCK_FILES and p.name != LAUNCH_RECORDS]


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def check_out_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber existing work; raise a one-line error describing what to do instead."""
    if resume and overwrite:
        raise KdlabError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise KdlabError(f"output path {path} exists and is not a folder")
    if resume:
        if not is_run_dir(path):
            raise KdlabError(f"nothing to resume: {path} is not a kdlab run directory")
        return
    if not path.exists() or not entries(path):
        return
    if not is_run_dir(path):
        raise KdlabError(f"output folder {path} is not empty and is not a kdlab run; choose another --out")
    if not overwrite:
        raise KdlabError(f"{path} already holds a run; pass --resume to continue it or --overwrite to replace it")


def clear_run(path: Path) -> None:
    """Remove the files a kdlab run writes (and only those)."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)


def remove_run(path: Path) -> None:
    """Remove a whole run folder's kdlab files; the folder itself only if nothing else (a user's file) is left."""
    clear_run(path)
    remove_stale_temps(path)
    for name in LOCK_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass  # not empty: what is left is not kdlab's


#: temporary folders kdlab assembles under the folder lock: checkpoints (``.tmp-epoch_NNNN-PID``) and analyses
#: (``.analysis.tmp-PID``)
TEMP_DIRS = re.compile(r"\.tmp-epoch_\d+-\d+|\.analysis\.tmp-\d+")


def is_stale_temp(path: Path) -> bool:
    """A temporary name kdlab writes under: ``.NAME.XXXXXXXX.tmp`` (atomic writes, :mod:`kdlab.engine.atomic`),
    ``.tmp-epoch_NNNN-PID`` (checkpoint folders), ``.analysis.tmp-PID`` (analysis folders). Nothing else: a file
    of yours that merely ends in ``.tmp`` is not kdlab's."""
    return bool(ANY_TEMP.fullmatch(path.name) or TEMP_DIRS.fullmatch(path.name))


def remove_stale_temps(folder: Path, subdirs: tuple[str, ...] = RUN_DIRS) -> list[Path]:
    """Remove temporaries left by killed writers in ``folder`` and its kdlab sub-folders (hold its lock first).

    Temporary files still locked by a live writer are left alone (:func:`kdlab.engine.atomic.remove_if_dead`)."""
    removed = []
    for d in [folder, *(folder / s for s in subdirs)]:
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if TEMP_DIRS.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
            elif ANY_TEMP.fullmatch(p.name) and remove_if_dead(p):
                removed.append(p)
    return removed


def open_run_folder(path: Path, *, resume: bool, overwrite: bool) -> FolderLock:
    """Lock a run folder for writing, re-check it under the lock, clear it for ``--overwrite`` (kdlab's own files
    only) and remove temporaries left by killed writers. The caller releases the returned lock."""
    lock = FolderLock(path).acquire()
    try:
        check_out_dir(path, resume=resume, overwrite=overwrite)  # again: another process may have written meanwhile
        if overwrite:
            clear_run(path)
        remove_stale_temps(path)
    except BaseException:
        lock.release(failed=True)
        raise
    return lock


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``RUN/metrics.jsonl`` ([] when there is none), read through :mod:`kdlab.fileio` (a regular file
    within ``KDLAB_MAX_BYTES_METRICS``). A torn last line of a killed writer, or a line that is not an object with an
    integer ``epoch``, is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not os.path.lexists(path):
        return []
    rows = []
    for line in read_text(path, "metrics", "metrics file").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends one JSON row per epoch to ``metrics.jsonl`` and mirrors all rows to ``metrics.csv``."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []

    def restore(self, last_epoch: int) -> None:
        """Keep rows up to ``last_epoch`` (rows of an epoch whose checkpoint was never written are dropped)."""
        self.rows = [r for r in read_metrics(self.jsonl.parent) if r["epoch"] <= last_epoch]
        self._flush()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv, buf.getvalue())
