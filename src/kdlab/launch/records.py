"""The launch folder: what was submitted where, and what each task last did.

``FOLDER/tasks/NAME.json`` is written by the submitting side (launcher, job ids of every submission, log path, the
tasks it waits for, a cancellation); ``FOLDER/tasks/NAME.state.json`` by the side that runs the task (``running``
with host, pid and attempt, then ``ended`` with the exit code). Two files, so neither side overwrites the other's
news. ``kdlab sweep --status`` reads them together with the queue (:mod:`kdlab.launch.status`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdlab.engine.atomic import atomic_write_text
from kdlab.errors import KdlabError

TASKS = "tasks"


@dataclass
class Submitted:
    """The submitting side's record of one task."""

    name: str
    launcher: str
    log: str
    after: list[str] = field(default_factory=list)
    jobs: list[str] = field(default_factory=list)  # job ids, oldest first (one per submission)
    submitted: float = 0.0
    cancelled: float | None = None

    @property
    def job_id(self) -> str | None:
        return self.jobs[-1] if self.jobs else None


@dataclass
class Progress:
    """The running side's record of one task: ``running``, ``ended`` or ``skipped`` (never started: ``note`` says
    why)."""

    state: str
    host: str = ""
    pid: int = 0
    job_id: str | None = None
    attempt: int = 0
    started: float = 0.0
    ended: float | None = None
    returncode: int | None = None
    note: str = ""


def _path(folder: Path, name: str, suffix: str) -> Path:
    return Path(folder) / TASKS / f"{name}{suffix}"


def _read(path: Path) -> dict[str, Any] | None:
    from kdlab.fileio import read_json

    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except KdlabError:
        return None  # a record being replaced, or damaged: treated as missing
    return data if isinstance(data, dict) else None


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


def read_submitted(folder: Path, name: str) -> Submitted | None:
    data = _read(_path(folder, name, ".json"))
    try:
        return None if data is None else Submitted(**data)
    except TypeError:
        return None


def write_submitted(folder: Path, rec: Submitted) -> None:
    _write(_path(folder, rec.name, ".json"), asdict(rec))


def record_submission(folder: Path, launcher: str, name: str, log: Path, after: list[str], job_id: str | None) -> None:
    """Note that task ``name`` was handed to ``launcher`` (as ``job_id``), keeping the ids of earlier submissions."""
    old = read_submitted(folder, name)
    jobs = (old.jobs if old is not None else []) + ([job_id] if job_id else [])
    write_submitted(folder, Submitted(name, launcher, str(log), list(after), jobs, time.time()))


def read_progress(folder: Path, name: str) -> Progress | None:
    data = _read(_path(folder, name, ".state.json"))
    try:
        return None if data is None else Progress(**data)
    except TypeError:
        return None


def write_progress(folder: Path, name: str, prog: Progress) -> None:
    _write(_path(folder, name, ".state.json"), asdict(prog))


def started(folder: Path, name: str, pid: int, job_id: str | None = None, attempt: int = 0) -> Progress:
    prog = Progress("running", socket.gethostname(), pid, job_id, attempt, time.time())
    write_progress(folder, name, prog)
    return prog


def ended(folder: Path, name: str, prog: Progress, returncode: int) -> None:
    prog.state, prog.ended, prog.returncode = "ended", time.time(), returncode
    write_progress(folder, name, prog)


def skipped(folder: Path, name: str, why: str) -> None:
    write_progress(folder, name, Progress("skipped", ended=time.time(), note=why))


def task_names(folder: Path) -> list[str]:
    """Every task with a submission record, in name order."""
    d = Path(folder) / TASKS
    if not d.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in d.iterdir() if p.name.endswith(".json") and not p.name.endswith(".state.json"))


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with that pid exists."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_error(log: Path, returncode: int | None) -> str:
    """The reason a task failed, from its log: the last ``kdlab: error:`` line, else the last line and the log path."""
    from kdlab.fileio import read_text

    try:
        text = read_text(log, "text") if Path(log).is_file() else ""
    except KdlabError:
        text = ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    msg = next((ln for ln in reversed(lines) if ln.startswith("kdlab: error:")), None)
    if msg:
        return msg[len("kdlab: error:") :].strip()
    tail = lines[-1][:200] if lines else "(empty log)"
    code = "" if returncode is None else f" with code {returncode}"
    return f"exited{code}: {tail} (log: {log})"
