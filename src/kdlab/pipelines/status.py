"""Where the runs of a plan folder (or one run folder) stand, and stopping them (``kdlab sweep --status/--cancel``).

Per run: ``done`` (top-1 / top-5), ``running`` (epoch k of N, node), ``pending``, ``failed`` (the last error line
and the log) or ``cancelled``. The run folders tell what finished and how far a run got; the launch records
(:mod:`kdlab.launch.records`) and the queue tell the rest (:func:`kdlab.launch.status.task_statuses`). A local run
in progress is recognised by the lock its process holds on the run folder (``/proc/locks``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from kdlab.engine.rundir import LOCK_NAME, PLAN_LOCK, is_run_dir
from kdlab.errors import KdlabError
from kdlab.launch import LAUNCH_DIR
from kdlab.launch import records as rec
from kdlab.launch.status import STATES, TaskStatus, task_statuses
from kdlab.pipelines.runner import RUN_TASK, TRAIN_EVAL


@dataclass
class RunState:
    run: str
    state: str
    detail: str = ""
    job_id: str | None = None
    node: str = ""


@dataclass
class StatusReport:
    folder: Path
    runs: list[RunState] = field(default_factory=list)
    extra: list[RunState] = field(default_factory=list)  # tasks that are not runs (the tables job)
    source: str = ""  # what told about jobs that left the queue

    def count(self, state: str) -> int:
        return sum(r.state == state for r in self.runs)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def text(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s}" for s in STATES if self.count(s))
        lines = [f"{self.folder}: {len(self.runs)} run{'s' if len(self.runs) != 1 else ''} — {counts or 'none'}"]
        width = max([len(r.run) for r in self.runs + self.extra] + [3])
        for r in self.runs + self.extra:
            where = "  ".join(x for x in (f"job {r.job_id}" if r.job_id else "", f"on {r.node}" if r.node else "") if x)
            lines.append(f"  {r.run:<{width}}  {r.state:<9}  {r.detail}" + (f"  ({where})" if where else ""))
        if self.source:
            lines.append(f"(Slurm: {self.source})")
        return "\n".join(lines)


def lock_holder(path: Path) -> int | None:
    """The pid holding an ``flock`` on ``path`` (from ``/proc/locks``), or ``None`` if none holds it here."""
    try:
        st = path.stat()
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev and parts[4].isdigit():
            return int(parts[4])
    return None


def _epochs(run: Path) -> tuple[int | None, int | None]:
    """(last finished epoch, epochs asked for) of a run folder (``None`` where unknown)."""
    from kdlab.config import read_yaml
    from kdlab.engine.rundir import read_metrics

    done = total = None
    with contextlib.suppress(KdlabError, OSError):
        rows = read_metrics(run)  # a torn last line of the writer is skipped
        done = rows[-1]["epoch"] if rows else 0
    with contextlib.suppress(KdlabError, OSError, TypeError, AttributeError):
        total = int(read_yaml(run / "config.yaml")["train"]["epochs"])
    return done, total


def _progress(run: Path) -> str:
    done, total = _epochs(run)
    if done is None and total is None:
        return "starting"
    return f"epoch {done or 0} of {total if total is not None else '?'}"


def _result(run: Path, finished_marker: str | None) -> str | None:
    """``top-1 … top-5 …`` of a finished run (``None`` if not finished)."""
    from kdlab.fileio import read_json

    if not (run / "summary.json").is_file() or (finished_marker and not (run / finished_marker).is_file()):
        return None
    try:
        s = read_json(run / "summary.json")
    except KdlabError:
        return None
    top5 = s.get("best_test_top5")
    five = f"  top-5 {top5:.2f}%" if isinstance(top5, (int, float)) else ""
    return f"top-1 {s.get('best_test_acc', float('nan')):.2f}%{five} (best epoch; final {s.get('final_test_acc', float('nan')):.2f}%)"


def _state(run: Path, name: str, tasks: dict[str, TaskStatus], finished_marker: str | None, local_busy: bool) -> RunState:
    label = name
    res = _result(run, finished_marker)
    ts = tasks.get(name)
    job = ts.job_id if ts is not None else None
    if res is not None:
        return RunState(label, "done", res, job, ts.node if ts else "")
    if ts is not None and ts.job_id and ts.state == "running":  # a Slurm job
        return RunState(label, "running", _progress(run), job, ts.node)
    if ts is not None and ts.job_id and ts.state == "pending":
        how = f"{_progress(run)} so far; " if run.is_dir() and is_run_dir(run) else ""
        return RunState(label, "pending", f"{how}{ts.detail or 'queued'}".rstrip("; "), job, ts.node)
    holder = lock_holder(run / LOCK_NAME) if run.is_dir() else None
    if holder is not None:
        return RunState(label, "running", f"{_progress(run)} (pid {holder})", job, os.uname().nodename)
    if ts is not None and ts.state == "running":
        return RunState(label, "running", "starting", job, ts.node)
    if ts is not None and ts.state in ("failed", "cancelled"):
        where = f" (log: {ts.log})" if ts.log and ts.log not in ts.detail else ""
        return RunState(label, ts.state, f"{ts.detail}{where}", job, ts.node)
    if ts is not None and ts.state == "done":
        return RunState(label, "failed", f"the task ended without the run's results (log: {ts.log})", job, ts.node)
    if run.is_dir() and is_run_dir(run):
        if local_busy:
            return RunState(label, "pending", f"stopped at {_progress(run)}; the running sweep resumes it")
        return RunState(label, "cancelled", f"stopped at {_progress(run)}; running the sweep again resumes it")
    return RunState(label, "pending", "not started" + ("" if local_busy else " (no sweep is running it)"))


def plan_status(folder: str | Path) -> StatusReport:
    """The status of every run of a plan folder (``plan.json``) or of one run folder."""
    from kdlab.fileio import read_json

    folder = Path(folder)
    if not folder.is_dir():
        raise KdlabError(f"--status: {folder} is not a folder")
    launch = folder / LAUNCH_DIR
    report = StatusReport(folder)
    if (folder / "plan.json").is_file():
        plan = read_json(folder / "plan.json")
        runs = [r["dir"] for r in plan.get("runs", []) if isinstance(r, dict) and "dir" in r]
        names = {d: d.replace("/", "__").replace(os.sep, "__") for d in runs}
        tasks, report.source = task_statuses(launch, [n for n in rec.task_names(launch)])
        busy = lock_holder(folder / PLAN_LOCK) is not None
        for d in runs:
            st = _state(folder / d, names[d], tasks, TRAIN_EVAL, busy)
            st.run = d
            report.runs.append(st)
        for n, ts in tasks.items():
            if n not in names.values():
                report.extra.append(RunState(n, ts.state, ts.detail, ts.job_id, ts.node))
    elif is_run_dir(folder) or (launch / rec.TASKS).is_dir():
        tasks, report.source = task_statuses(launch, [RUN_TASK]) if (launch / rec.TASKS).is_dir() else ({}, "")
        st = _state(folder, RUN_TASK, tasks, None, False)
        st.run = str(folder)
        report.runs.append(st)
    else:
        raise KdlabError(f"--status: {folder} is neither a plan folder (plan.json) nor a kdlab run")
    return report


def cancel_plan(folder: str | Path) -> list[str]:
    """Stop what works on a plan or run folder: ``scancel`` its queued and running Slurm jobs, SIGTERM the local
    sweep (or run) holding its lock (runs stop resumably). Returns one line per action."""
    from kdlab.launch import slurm_queue

    folder = Path(folder)
    if not folder.is_dir():
        raise KdlabError(f"--cancel: {folder} is not a folder")
    launch = folder / LAUNCH_DIR
    done: list[str] = []
    names = rec.task_names(launch)
    subs = {n: rec.read_submitted(launch, n) for n in names}
    slurm = {n: s.job_id for n, s in subs.items() if s is not None and s.launcher == "slurm" and s.job_id}
    if slurm:
        active = slurm_queue.queue(list(slurm.values()))
        ids = sorted({j for j in slurm.values() if j in active})
        if ids:
            slurm_queue.cancel(ids)
            done.append(f"scancel {len(ids)} job(s): {', '.join(ids[:8])}{' …' if len(ids) > 8 else ''}")
        import time

        for n, j in slurm.items():
            s = subs[n]
            if j in active and s is not None:
                s.cancelled = time.time()
                rec.write_submitted(launch, s)
    for lock in (folder / PLAN_LOCK, folder / LOCK_NAME):
        pid = lock_holder(lock) if lock.is_file() else None
        if pid is not None and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                done.append(f"sent SIGTERM to pid {pid} (it holds {lock.name})")
    return done
