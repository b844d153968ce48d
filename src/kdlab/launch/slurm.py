"""The Slurm launcher: tasks as Slurm jobs submitted through submitit, requeued when preempted or out of time.

Tasks with the same resources and the same tasks to wait for become one **job array** (a sweep is one array; the
students of one teacher run are one array that starts once that run has succeeded, ``--dependency=afterok``, and is
cancelled if it fails, ``--kill-on-invalid-dep=yes``). Before anything is submitted, every distinct request is shown
to ``sbatch --test-only``, so an unknown partition or a time over the limit fails with one line and nothing queued;
should a real submission still be refused, the jobs submitted before it are cancelled.

On a node, each job runs :class:`SlurmTask`: the task's command (``python -m kdlab ...``, the same as on the local
launcher) as a child process, its output appended to the task's log. Jobs ask for ``SIGUSR2`` ``signal_delay_s``
seconds before their time limit (at most a third of the limit: ``LauncherConfig.requeue_signal_s``); submitit
catches it, calls :meth:`SlurmTask.checkpoint` (which stops the kdlab process resumably: SIGTERM, the last epoch
checkpoint is kept) and requeues the job with ``scontrol requeue``, at most
``max_timeouts`` times for time limits (preemptions do not count). A requeued job (also ``scontrol requeue`` by an
admin, or a preemption with requeue) runs the same command again, which resumes from the last checkpoint: the run's
folder lock keeps a second writer out. With ``nodes`` × ``tasks_per_node`` > 1, srun starts one process per task
and kdlab forms its process group from Slurm's environment (:mod:`kdlab.engine.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from kdlab.config import LauncherConfig
from kdlab.engine.progress import EPOCH_LINE
from kdlab.errors import KdlabError
from kdlab.launch import records, slurm_queue
from kdlab.launch.base import LaunchTask, Launcher, OnEnd, Submission, TaskEnd, check_tasks
from kdlab.launch.local import task_env
from kdlab.trust import allow_shell

SUBMITIT_DIR = "slurm"  # under the launch folder: submitit's sbatch scripts, pickles and its own logs
POLL_ENV = "KDLAB_SLURM_POLL_S"


class TaskFailed(RuntimeError):
    """The task's command exited with a non-zero code (the job then ends FAILED, so ``afterok`` jobs do not start)."""


class SlurmTask(Checkpointable):
    """What a Slurm job runs: the task's command as a child process (see the module docstring)."""

    #: attempts in a row that reached their time limit before an epoch finished, after which the job is not requeued
    MAX_STALLS = 2

    def __init__(self, name: str, argv: Sequence[str], log: str, folder: str, env: dict[str, str],
                 stop_s: float = 60.0, timeout_after_s: float | None = None, stalls: int = 0) -> None:  # fmt: skip
        self.name, self.argv, self.log, self.folder, self.env = name, list(argv), log, folder, dict(env)
        self.stop_s = stop_s  # how long the command may take to stop before it is killed (then the requeue)
        self.timeout_after_s = timeout_after_s  # a stop signal this long into an attempt is the time limit's
        self.stalls = stalls  # attempts in a row that reached the time limit without finishing an epoch
        self._proc: subprocess.Popen | None = None
        self._prog: records.Progress | None = None
        self._log_from, self._t0 = 0, time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_prog", "_log_from", "_t0")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _proc=None, _prog=None, _log_from=0, _t0=time.monotonic())

    def __call__(self) -> int:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
        log = Path(self.log) if rank == 0 else Path(f"{self.log}.rank{rank}")
        log.parent.mkdir(parents=True, exist_ok=True)
        job_id = _job_id()
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        folder = Path(self.folder)
        with open(log, "a") as logf:
            print(f"--- slurm job {job_id} attempt {attempt + 1} on {os.uname().nodename} (rank {rank}) at "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}", file=logf, flush=True)  # fmt: skip
            self._log_from, self._t0 = logf.tell(), time.monotonic()
            self._proc = proc = subprocess.Popen(self.argv, stdout=logf, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env={**os.environ, **self.env})  # fmt: skip
            self._prog = records.started(folder, self.name, proc.pid, job_id, attempt) if rank == 0 else None
            # polled, never a blocking wait(): the requeue signal's handler (checkpoint) polls the same process, and a
            # wait() it interrupted would hold the lock those polls need
            while (rc := proc.poll()) is None:
                time.sleep(0.5)
        if self._prog is not None:  # (unless the requeue signal's handler recorded the end)
            records.ended(folder, self.name, self._prog, rc)
        if rc != 0:
            raise TaskFailed(f"{self.name}: exited with code {rc} (log: {log})")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """Before the requeue: stop the kdlab process (SIGTERM; it keeps its last epoch checkpoint), killing it if it
        has not stopped within ``stop_s`` (its files are written atomically), so that the requeue happens before
        Slurm's own kill at the time limit. The requeued job runs the same command; ``None`` (no requeue, the task
        failed) after :attr:`MAX_STALLS` attempts in a row stopped at the limit before an epoch finished."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            for sig, patience in ((signal.SIGTERM, self.stop_s), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(OSError):
                    proc.send_signal(sig)
                t0 = time.monotonic()
                while proc.poll() is None and time.monotonic() - t0 < patience:
                    time.sleep(0.1)
                if proc.returncode is not None:
                    break
        stalls = self.stalls + 1 if self._stalled() else 0
        give_up = stalls >= self.MAX_STALLS  # submitit then ends the job (FAILED) instead of requeueing it
        rc = None if proc is None else proc.returncode
        if give_up:
            with contextlib.suppress(OSError), open(self.log, "a") as logf:
                print(f"kdlab: error: not requeued: {stalls} attempts in a row reached the time limit before an "
                      f"epoch finished; raise launcher.time", file=logf, flush=True)  # fmt: skip
            rc = 1  # the task failed, not "stopped": --status says so, with the line above
        if self._prog is not None and rc is not None:
            records.ended(Path(self.folder), self.name, self._prog, rc)
            self._prog = None  # recorded once
        if give_up:
            return None
        task = SlurmTask(self.name, self.argv, self.log, self.folder, self.env, self.stop_s, self.timeout_after_s,
                         stalls)  # fmt: skip
        return DelayedSubmission(task)

    def _stalled(self) -> bool:
        """Whether this attempt reached its time limit (not a preemption: it ran ``timeout_after_s`` at least) without
        an ``epoch k/N`` line in its log: requeued again, it would get no further."""
        if self.timeout_after_s is None or time.monotonic() - self._t0 < self.timeout_after_s:
            return False
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_from)
                text = f.read(16 << 20).decode("utf-8", "replace")
        except OSError:
            return False
        return EPOCH_LINE.search(text) is None


def _job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def executor_parameters(s: LauncherConfig, job_name: str, dependency: str | None = None) -> dict[str, Any]:
    """submitit ``SlurmExecutor`` parameters of one request (the launcher section, a job name, a dependency)."""
    tasks = s.tasks_per_node or max(1, s.gpus_per_node)
    extra: dict[str, Any] = {"requeue": True}  # preemption requeues; scontrol requeue is allowed
    if dependency:
        extra.update(dependency=dependency, **{"kill-on-invalid-dep": "yes"})
    extra.update(s.additional)
    p: dict[str, Any] = {
        "job_name": job_name, "nodes": s.nodes, "ntasks_per_node": tasks, "signal_delay_s": s.requeue_signal_s,
        "array_parallelism": s.array_parallelism, "stderr_to_stdout": True, "additional_parameters": extra,
    }  # fmt: skip
    optional = {"partition": s.partition, "time": s.time_minutes, "cpus_per_task": s.cpus_per_task,
                "account": s.account, "qos": s.qos, "constraint": s.constraint,
                "gpus_per_node": s.gpus_per_node or None, "setup": list(s.setup) or None,
                "mem": None if s.mem_gb is None else f"{max(1, round(s.mem_gb * 1024))}M"}  # fmt: skip
    p.update({k: v for k, v in optional.items() if v is not None})
    return p


def test_script(s: LauncherConfig, folder: Path, array: int) -> str:
    """The sbatch script submitit would write for this request (run as ``sbatch --test-only``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(s, "kdlab-check")
    return _make_sbatch_string(command="true", folder=folder, map_count=array if array > 1 else None, **params)


class SlurmSubmission(Submission):
    def wait(self, on_end: OnEnd | None = None) -> dict[str, TaskEnd]:
        from kdlab.launch.status import end_from_records

        poll = float(os.environ.get(POLL_ENV, "5"))
        ends: dict[str, TaskEnd] = {}
        t0 = time.perf_counter()
        while len(ends) < len(self.tasks):
            left = {n: j for n, j in self.job_ids.items() if n not in ends}
            active = slurm_queue.queue(list(left.values()))
            gone = [n for n, j in left.items() if j not in active]
            if gone:
                final, _ = slurm_queue.ended([left[n] for n in gone])
                for n in gone:
                    end = end_from_records(self.folder, self.tasks[n], left[n], final.get(left[n]))
                    end.seconds = time.perf_counter() - t0
                    ends[n] = end
                    if on_end is not None:
                        on_end(end)
            if len(ends) < len(self.tasks):
                time.sleep(poll)
        return ends

    def cancel(self) -> None:
        slurm_queue.cancel(list(self.job_ids.values()))


class SlurmLauncher(Launcher):
    """Slurm jobs through submitit (see the module docstring)."""

    name = "slurm"

    def __init__(self, settings: LauncherConfig, jobs: int = 1, threads: int | None = None) -> None:
        super().__init__(settings)
        if jobs != 1:
            raise KdlabError(
                "--jobs runs local worker processes; with --launcher slurm every run is a job (launcher.array_parallelism "
                "caps how many of an array run at once)"
            )
        self.threads = threads

    def _settings(self, t: LaunchTask) -> LauncherConfig:
        return t.resources or self.settings

    def groups(self, tasks: Sequence[LaunchTask]) -> list[list[LaunchTask]]:
        """Tasks that become one job array: same resources, same tasks and jobs to wait for, in first-seen order."""
        out: dict[str, list[LaunchTask]] = {}
        for t in tasks:
            key = json.dumps([self._settings(t).model_dump(mode="json"), sorted(t.after), sorted(t.after_jobs),
                              t.after_any], sort_keys=True)  # fmt: skip
            out.setdefault(key, []).append(t)
        return list(out.values())

    def check(self, tasks: Sequence[LaunchTask]) -> None:
        check_tasks(tasks)
        for s in {id(s): s for s in map(self._settings, tasks)}.values():
            for line in s.setup:
                allow_shell("launcher.setup", line)
            if s.python:
                allow_shell("launcher.python", s.python)
        slurm_queue.require_slurm("sbatch")
        seen: set[str] = set()
        for group in self.groups(tasks):
            s = self._settings(group[0])
            key = json.dumps([s.model_dump(mode="json"), len(group) > 1], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            with tempfile.TemporaryDirectory() as tmp:
                script = test_script(s, Path(tmp), len(group))
                res = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True,
                                     timeout=slurm_queue.TIMEOUT_S)  # fmt: skip
            if res.returncode != 0:
                raise KdlabError(f"sbatch refused the request ({describe(s)}): {slurm_queue.one_line(res.stderr)}; "
                                 "nothing was submitted")  # fmt: skip

    def submit(self, tasks: Sequence[LaunchTask], folder: Path, job_name: str = "kdlab") -> SlurmSubmission:
        self.check(tasks)
        folder = Path(folder).absolute()
        sub = SlurmSubmission(tasks, folder)
        try:
            for group in self.groups(tasks):
                s = self._settings(group[0])
                first = group[0]
                kind = "afterany" if first.after_any else "afterok"
                deps = [sub.job_ids[a] for a in first.after] + list(first.after_jobs)
                ex = submitit.SlurmExecutor(folder=folder / SUBMITIT_DIR, max_num_timeout=s.max_timeouts,
                                            python=s.python)  # fmt: skip
                ex.update_parameters(**executor_parameters(s, job_name, f"{kind}:{':'.join(deps)}" if deps else None))
                with ex.batch():
                    jobs = [ex.submit(self._callable(t, folder)) for t in group]
                for t, job in zip(group, jobs):
                    sub.job_ids[t.name] = str(job.job_id)
                    records.record_submission(folder, self.name, t.name, t.log, list(t.after), str(job.job_id))
        except Exception as err:
            done = list(sub.job_ids.values())
            with contextlib.suppress(KdlabError):
                slurm_queue.cancel(done)
            msg = slurm_queue.one_line(str(err) or repr(err))
            after = f"; the {len(done)} job(s) submitted before were cancelled" if done else "; nothing was submitted"
            raise KdlabError(f"submitting to Slurm failed: {msg}{after}") from None
        return sub

    def _callable(self, t: LaunchTask, folder: Path) -> SlurmTask:
        env = {k: v for k, v in task_env(t, self.threads).items() if k not in os.environ or os.environ[k] != v}
        argv = list(t.argv)
        s = self._settings(t)
        if s.python and argv and argv[0] == sys.executable:
            argv = [*shlex.split(s.python), *argv[1:]]
        stop_s = max(5.0, min(60.0, s.requeue_signal_s / 3))  # the signal comes up to 30 s early, the kill on time
        # Slurm signals up to 30 s early; 15 s more for the job's start before the attempt's clock starts
        after = None if s.time_minutes is None else max(0.0, 60.0 * s.time_minutes - s.requeue_signal_s - 45)
        return SlurmTask(t.name, argv, str(Path(t.log).absolute()), str(folder), env, stop_s, after)


def describe(s: LauncherConfig) -> str:
    """A short text of a request, for error messages."""
    keys = ("partition", "time", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "account",
            "qos", "constraint")  # fmt: skip
    return ", ".join(f"{k}={getattr(s, k)}" for k in keys if getattr(s, k) not in (None, 0) and not (k == "nodes" and s.nodes == 1)) or "defaults"
