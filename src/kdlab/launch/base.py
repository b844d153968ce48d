"""What every launcher shares: tasks, their ends, submissions, and the checks made before anything starts.

A :class:`LaunchTask` is one command (an argv, normally ``python -m kdlab ...``) with a log file and the names of the
tasks that must have succeeded before it starts. A :class:`Launcher` decides only *where* tasks run; the command is
the same everywhere, so whatever the command guarantees (resume, one writer per run folder) holds on every launcher.
"""

from __future__ import annotations

import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kdlab.config import LauncherConfig
from kdlab.errors import KdlabError

#: task names are file names in the launch folder: letters, digits and ``_ . , = + - [ ] @``
_NAME = re.compile(r"[\w.,=+\-\[\]@]+")

#: the states a task ends in
END_STATES = ("done", "failed", "cancelled", "skipped")


def kdlab_argv(*args: str) -> tuple[str, ...]:
    """``python -m kdlab ARGS`` with this interpreter (what a task normally runs)."""
    return (sys.executable, "-m", "kdlab", *map(str, args))


@dataclass(frozen=True)
class LaunchTask:
    """One command to run somewhere.

    ``name`` is unique within a submission (it names the task's record file and its Slurm job); ``log`` receives the
    command's stdout and stderr (appended, so a requeued task's attempts follow each other); ``after`` names tasks of
    the same submission that must end successfully first (a failed one skips this task); ``threads`` caps the torch
    and OpenMP threads of the process; ``resources`` overrides the launcher's settings for this task (Slurm: another
    partition, time or GPU count, e.g. for a teacher stage); ``after_jobs`` are job ids of earlier submissions
    (still queued) that must succeed first; ``after_any`` starts the task once its ``after`` tasks have ended,
    whatever their end (e.g. a job writing the tables of a plan).
    """

    name: str
    argv: tuple[str, ...]
    log: Path
    after: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    threads: int | None = None
    resources: LauncherConfig | None = None
    after_jobs: tuple[str, ...] = ()
    after_any: bool = False


@dataclass
class TaskEnd:
    """How a task ended: ``done`` (exit 0), ``failed``, ``cancelled`` (scancel, kdlab ... --cancel, an interrupt)
    or ``skipped`` (a task it waits for did not succeed)."""

    name: str
    state: str
    returncode: int | None = None
    seconds: float | None = None
    error: str | None = None
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.state == "done"


OnEnd = Callable[[TaskEnd], None]


class Submission(ABC):
    """Tasks handed to a launcher: their job ids, waiting for their ends, cancelling them."""

    def __init__(self, tasks: Sequence[LaunchTask], folder: Path) -> None:
        self.tasks = {t.name: t for t in tasks}
        self.folder = Path(folder)
        self.job_ids: dict[str, str] = {}

    @abstractmethod
    def wait(self, on_end: OnEnd | None = None) -> dict[str, TaskEnd]:
        """Block until every task has ended; ``on_end`` is called once per task as it ends. Returns every end."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop the tasks that have not ended (a running kdlab run stops resumably)."""


class Launcher(ABC):
    """Runs :class:`LaunchTask` s somewhere. ``folder`` (the *launch folder*) receives the launcher's records."""

    name: ClassVar[str]

    def __init__(self, settings: LauncherConfig) -> None:
        self.settings = settings

    def check(self, tasks: Sequence[LaunchTask]) -> None:
        """Raise a one-line :class:`~kdlab.errors.KdlabError` if ``tasks`` cannot all be submitted (nothing is)."""
        check_tasks(tasks)

    @abstractmethod
    def submit(self, tasks: Sequence[LaunchTask], folder: Path, job_name: str = "kdlab") -> Submission:
        """Check, then hand every task over (all of them or, on an error, none); ``job_name`` labels the jobs."""


def check_tasks(tasks: Sequence[LaunchTask]) -> None:
    """Names unique and file-safe, every ``after`` naming an earlier task (so the order has no cycle)."""
    seen: set[str] = set()
    for t in tasks:
        if not _NAME.fullmatch(t.name) or t.name.startswith("."):
            raise KdlabError(f"task name '{t.name}' must be letters, digits and _ . , = + - [ ] @ (a file name)")
        if t.name in seen:
            raise KdlabError(f"two tasks are named '{t.name}'")
        if not t.argv:
            raise KdlabError(f"task '{t.name}' has an empty command")
        missing = [a for a in t.after if a not in seen]
        if missing:
            raise KdlabError(f"task '{t.name}' waits for '{missing[0]}', which is not an earlier task of the submission")
        seen.add(t.name)


def blocked_by(task: LaunchTask, ends: dict[str, TaskEnd]) -> str | None:
    """The first task ``task`` waits for that ended without success (``None`` if none, or if ``after_any``)."""
    if task.after_any:
        return None
    return next((a for a in task.after if a in ends and not ends[a].ok), None)


