"""The local launcher: tasks as processes of this machine, at most ``jobs`` at a time (``--jobs``).

Processes start when :meth:`LocalSubmission.wait` runs (a task once the tasks it waits for have succeeded; one whose
teacher failed is skipped) and are stopped with SIGTERM if the waiting process is interrupted. Each process is
limited to ``threads`` OpenMP/torch threads (default: CPU cores // jobs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from kdlab.config import LauncherConfig
from kdlab.errors import KdlabError
from kdlab.launch import records
from kdlab.launch.base import LaunchTask, Launcher, OnEnd, Submission, TaskEnd, blocked_by
from kdlab.signals import SIGTERM_EXIT

#: exit codes of a process that was stopped (SIGTERM, Ctrl-C, SIGKILL), not one that failed
STOPPED = {SIGTERM_EXIT, 130, -15, -2, -9}


def task_env(task: LaunchTask, threads: int | None) -> dict[str, str]:
    """The environment of a task's process: ours, unbuffered output, the thread cap, the task's own entries."""
    from kdlab.trust import child_env

    env = dict(os.environ, PYTHONUNBUFFERED="1", **child_env())
    n = task.threads or threads
    if n:
        env["OMP_NUM_THREADS"] = str(n)
    env.update(dict(task.env))
    return env


def end_of(task: LaunchTask, returncode: int, seconds: float, job_id: str | None = None) -> TaskEnd:
    """A finished process's :class:`TaskEnd` (its error read from the log)."""
    if returncode == 0:
        return TaskEnd(task.name, "done", 0, seconds, job_id=job_id)
    state = "cancelled" if returncode in STOPPED else "failed"
    return TaskEnd(task.name, state, returncode, seconds, records.last_error(task.log, returncode), job_id)


class LocalSubmission(Submission):
    def __init__(self, tasks: Sequence[LaunchTask], folder: Path, jobs: int, threads: int | None) -> None:
        super().__init__(tasks, folder)
        self.jobs, self.threads = jobs, threads
        self._running: dict[subprocess.Popen, tuple[LaunchTask, float, IO[str], records.Progress]] = {}
        self._cancelled = False

    def _start(self, t: LaunchTask) -> None:
        t.log.parent.mkdir(parents=True, exist_ok=True)
        logf = open(t.log, "a")
        proc = subprocess.Popen(list(t.argv), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=task_env(t, self.threads), text=True)  # fmt: skip
        self.job_ids[t.name] = f"pid {proc.pid}"
        prog = records.started(self.folder, t.name, proc.pid)
        self._running[proc] = (t, time.perf_counter(), logf, prog)

    def wait(self, on_end: OnEnd | None = None) -> dict[str, TaskEnd]:
        ends: dict[str, TaskEnd] = {}
        pending = list(self.tasks.values())

        def finish(end: TaskEnd) -> None:
            ends[end.name] = end
            if on_end is not None:
                on_end(end)

        try:
            while pending or self._running:
                for t in list(pending):
                    dep = blocked_by(t, ends)
                    if dep is not None or self._cancelled:
                        pending.remove(t)
                        why = "cancelled" if self._cancelled else f"{dep} did not succeed"
                        records.skipped(self.folder, t.name, why)
                        finish(TaskEnd(t.name, "skipped" if dep else "cancelled", error=why))
                        continue
                    if len(self._running) >= self.jobs:
                        break
                    if any(a not in ends for a in t.after):
                        continue  # a task it waits for is still to run
                    pending.remove(t)
                    self._start(t)
                done = [p for p in self._running if p.poll() is not None]
                if not done:
                    time.sleep(0.1)
                    continue
                for p in done:
                    t, t0, logf, prog = self._running.pop(p)
                    logf.close()
                    records.ended(self.folder, t.name, prog, p.returncode)
                    finish(end_of(t, p.returncode, time.perf_counter() - t0, self.job_ids.get(t.name)))
        except BaseException:
            self.cancel()
            raise
        return ends

    def cancel(self) -> None:
        self._cancelled = True
        for p in self._running:
            with contextlib.suppress(OSError):
                p.terminate()
        for p, (t, _, logf, prog) in list(self._running.items()):
            with contextlib.suppress(Exception):
                p.wait(timeout=30)
            if p.returncode is None:  # it did not stop (a worker absorbs stop signals after the first): kill it
                with contextlib.suppress(Exception):
                    p.kill()
                    p.wait(timeout=10)
            if p.returncode is not None:
                records.ended(self.folder, t.name, prog, p.returncode)
            logf.close()
        self._running.clear()


class LocalLauncher(Launcher):
    """``jobs`` processes at a time on this machine, each capped to ``threads`` threads."""

    name = "local"

    def __init__(self, settings: LauncherConfig, jobs: int = 1, threads: int | None = None) -> None:
        super().__init__(settings)
        if jobs < 1:
            raise KdlabError(f"--jobs must be at least 1, got {jobs}")
        self.jobs = jobs
        self.threads = threads or max(1, (os.cpu_count() or 1) // jobs)

    def submit(self, tasks: Sequence[LaunchTask], folder: Path, job_name: str = "kdlab") -> LocalSubmission:
        self.check(tasks)
        if any(t.after_jobs for t in tasks):
            raise KdlabError("the local launcher cannot wait for jobs of another launcher (after_jobs)")
        for t in tasks:
            records.record_submission(folder, self.name, t.name, t.log, list(t.after), None)
        return LocalSubmission(tasks, folder, self.jobs, self.threads)
