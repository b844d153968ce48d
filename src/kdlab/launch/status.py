"""Where the tasks of a launch folder stand: pending, running (where), done, failed (why) or cancelled.

One ``squeue`` call covers every Slurm job of the folder; jobs that left the queue are told apart by the records the
job wrote (:mod:`kdlab.launch.records`) and, for jobs that never started or were killed outright, by ``sacct`` or,
without accounting, ``scontrol`` (which remembers a job for a few minutes after its end). What told is in ``source``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from kdlab.errors import KdlabError
from kdlab.launch import records, slurm_queue
from kdlab.launch.base import LaunchTask, TaskEnd
from kdlab.launch.local import STOPPED, end_of

#: the states a task can be in
STATES = ("pending", "running", "done", "failed", "cancelled")

_SLURM_FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class TaskStatus:
    name: str
    state: str
    job_id: str | None = None
    node: str = ""
    detail: str = ""
    log: str = ""


def end_from_records(folder: Path, task: LaunchTask, job_id: str, final: slurm_queue.Ended | None) -> TaskEnd:
    """How a Slurm job that left the queue ended: its own record first, then what Slurm remembers."""
    prog = records.read_progress(folder, task.name)
    if prog is not None and prog.state == "ended" and prog.job_id == job_id and prog.returncode is not None:
        return end_of(task, prog.returncode, 0.0, job_id)
    sub = records.read_submitted(folder, task.name)
    if sub is not None and sub.cancelled:
        return TaskEnd(task.name, "cancelled", error="cancelled with --cancel", job_id=job_id)
    started = prog is not None and prog.job_id == job_id
    if final is not None and final.state.startswith("CANCELLED") and not started:
        return TaskEnd(task.name, "cancelled", error="cancelled before it started (a task it waits for failed, or scancel)", job_id=job_id)
    if final is not None and final.state.split()[0] in _SLURM_FAILED | {"CANCELLED"}:
        state = "cancelled" if final.state.startswith("CANCELLED") else "failed"
        return TaskEnd(task.name, state, error=f"Slurm ended the job {final.state} (exit {final.exit_code}; log: {task.log})", job_id=job_id)
    what = "while its task was running" if started else "before its task started"
    return TaskEnd(task.name, "failed" if started else "cancelled",
                   error=f"job {job_id} left the queue {what} and Slurm no longer tells how (log: {task.log})", job_id=job_id)  # fmt: skip


def task_statuses(folder: Path, names: list[str] | None = None) -> tuple[dict[str, TaskStatus], str]:
    """The status of each recorded task of ``folder`` (or of ``names``), and a note on what Slurm could tell."""
    names = records.task_names(folder) if names is None else names
    subs = {n: records.read_submitted(folder, n) for n in names}
    progs = {n: records.read_progress(folder, n) for n in names}
    slurm = {n: s.job_id for n, s in subs.items() if s is not None and s.launcher == "slurm" and s.job_id}
    try:
        active = slurm_queue.queue(list(slurm.values())) if slurm else {}
    except KdlabError as err:  # Slurm not reachable from here: what the records say, and that it is only that
        return _recorded(folder, names, subs, progs, slurm), f"the last recorded states only, {err}"
    gone = {n: j for n, j in slurm.items() if j not in active}
    final, source = slurm_queue.ended(list(gone.values())) if gone else ({}, "")
    host = socket.gethostname()
    out: dict[str, TaskStatus] = {}
    for n in names:
        sub, prog = subs[n], progs[n]
        if sub is None:
            continue
        log = sub.log
        if n in slurm and slurm[n] in active:
            q = active[slurm[n]]
            state = "running" if q.state in ("RUNNING", "COMPLETING", "CONFIGURING") else "pending"
            detail = q.state.lower() if state == "pending" and q.state != "PENDING" else ""
            if state == "pending" and q.reason and q.reason != "None":
                detail = f"{detail} ({q.reason})".strip()
            if state == "pending" and prog is not None and prog.job_id == slurm[n]:
                detail = f"requeued after attempt {prog.attempt + 1} {detail}".strip()
            out[n] = TaskStatus(n, state, slurm[n], q.nodes, detail, log)
            continue
        if n in slurm:
            t = LaunchTask(n, ("?",), Path(log), tuple(sub.after))
            end = end_from_records(folder, t, slurm[n], final.get(slurm[n]))
            out[n] = TaskStatus(n, end.state if end.state != "skipped" else "cancelled", slurm[n],
                                prog.host if prog else "", end.error or "", log)  # fmt: skip
            continue
        # the local launcher
        if prog is not None and prog.state == "skipped":
            out[n] = TaskStatus(n, "cancelled", None, "", f"not started: {prog.note}", log)
        elif prog is None:
            state = "cancelled" if sub.cancelled else "pending"
            out[n] = TaskStatus(n, state, None, "", "not started", log)
        elif prog.state == "running":
            alive = prog.host != host or records.pid_alive(prog.pid)
            detail = f"pid {prog.pid}" if alive else f"its process {prog.pid} is gone (killed?)"
            out[n] = TaskStatus(n, "running" if alive else "cancelled", None, prog.host, detail, log)
        else:
            rc = prog.returncode if prog.returncode is not None else -1
            state = "done" if rc == 0 else "cancelled" if rc in STOPPED else "failed"
            detail = "" if rc == 0 else records.last_error(Path(log), rc)
            out[n] = TaskStatus(n, state, None, prog.host, detail, log)
    return out, source


def _recorded(folder: Path, names: list[str], subs: dict, progs: dict, slurm: dict[str, str]) -> dict[str, TaskStatus]:
    """Task states from the launch records alone (the queue could not be asked): last recorded, said so."""
    out: dict[str, TaskStatus] = {}
    for n in names:
        sub, prog = subs[n], progs[n]
        if sub is None:
            continue
        job = slurm.get(n)
        if prog is not None and prog.state == "ended" and prog.returncode is not None and prog.job_id == job:
            end = end_of(LaunchTask(n, ("?",), Path(sub.log)), prog.returncode, 0.0, job)
            out[n] = TaskStatus(n, end.state, job, prog.host, end.error or "", sub.log)
        elif prog is not None and prog.state == "running" and prog.job_id == job:
            out[n] = TaskStatus(n, "running", job, prog.host, "last recorded state", sub.log)
        else:
            out[n] = TaskStatus(n, "pending", job, "", "last recorded state: submitted", sub.log)
    return out
