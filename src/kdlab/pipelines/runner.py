"""Executing a plan: skip finished runs, resume interrupted ones, run the rest here or through a launcher.

A run of a plan is *finished* when its folder holds ``summary.json`` and ``train_eval.json`` (the accuracy on the
training split in eval mode, written right after the run by :func:`run_task`). A folder that is a kdlab run but not
finished is resumed exactly (``kdlab.engine`` checkpoints every epoch); a missing or empty folder is a new run.
Before anything runs, every existing folder's ``config.yaml`` is compared with the plan's config for it, so a sweep
never mixes runs of different settings. One plan folder is worked on by one process at a time (a lock file).

``jobs == 1`` on the local launcher runs everything in this process. Otherwise every run is one task of a
:mod:`kdlab.launch` launcher — ``python -m kdlab.pipelines.worker OUT/.kdlab-launch/jobs/RUN.json``, the same command
on every launcher — whose output goes to ``OUT/logs/RUN.log``: ``--jobs J`` worker processes here, or Slurm jobs
(``--launcher slurm``: one job array per group of runs with the same resources and teacher; submitted, then
``kdlab sweep --status OUT`` follows them and a last job writes the tables). A run starts once its teacher's run has
finished; a failed run fails the runs it teaches.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config import LauncherConfig, RunConfig, read_yaml, validate
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import PLAN_LOCK, entries, is_run_dir, open_lock_file
from kdlab.errors import ConfigError, KdlabError
from kdlab.launch import LAUNCH_DIR, LaunchTask, TaskEnd, get_launcher
from kdlab.pipelines.plan import Task
from kdlab.pipelines.plan_cache import ensure_teacher_cache, same_plan_cache

TRAIN_EVAL = "train_eval.json"
#: keys that may differ between a run's saved config.yaml and the plan (they do not change results)
VOLATILE = {"train.progress", "train.threads", "train.device", "meta", "launcher"}
WORKER = "kdlab.pipelines.worker"

Log = Callable[[str], None]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / TRAIN_EVAL).is_file()


def run_status(d: Path, cfg: RunConfig) -> str:
    """``done`` | ``resume`` | ``new`` for the run of ``cfg`` in folder ``d``; raises if the folder holds something
    else or a run of another config (a plan-made teacher cache path of the same teacher is adopted into ``cfg``)."""
    if d.exists() and not d.is_dir():
        raise KdlabError(f"{d} exists and is not a folder")
    if not d.exists() or not entries(d):  # a lock file alone (a start that failed) is nothing
        return "new"
    if not is_run_dir(d):
        raise KdlabError(f"{d} is not empty and is not a kdlab run; move it away")
    status = "done" if is_finished(d) else "resume"
    if (d / "config.yaml").is_file():
        from kdlab.engine.resume import first_difference

        ignore = VOLATILE | ({"train.epochs"} if status == "resume" else set())
        raw = read_yaml(d / "config.yaml")
        try:  # through the current schema: keys added since the run was made take their defaults
            saved = validate(raw).to_dict()
        except KdlabError:
            saved = raw
        old_cache = (saved.get("teacher") or {}).get("cache")
        if cfg.teacher is not None and old_cache != cfg.teacher.cache and same_plan_cache(old_cache, cfg.teacher.cache):
            cfg.teacher.cache = old_cache  # the run keeps the cache file it was made with (same teacher, views)
        diff = first_difference(saved, cfg.to_dict(), ignore)
        if diff:
            raise ConfigError(
                f"{d} holds a run made with a different '{diff}' than this plan asks for; "
                "use another --out (or delete that run)"
            )
    return status


def task_status(task: Task) -> str:
    """:func:`run_status` of a plan's run."""
    return run_status(task.out, task.cfg)


def run_task(cfg: RunConfig, out: Path, resume: bool, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) one run of a plan, then record its training-split accuracy; returns its results."""
    from kdlab.engine import Trainer

    trainer = Trainer(cfg, out, resume=resume, log=log)
    summary = trainer.run().summary
    ev = trainer.evaluate("train")
    record = {"train_eval_acc": ev["acc"], "train_eval_loss": ev["loss"], "split": "train", "n": trainer.data.num_train}
    if trainer.dist.is_main:
        atomic_write_text(Path(out) / TRAIN_EVAL, json.dumps(record, indent=1))
    return {**summary, **record}


def load_result(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` merged with ``train_eval.json`` of a finished run."""
    from kdlab.fileio import read_json

    out = read_json(run_dir / "summary.json")
    te = run_dir / TRAIN_EVAL
    if te.is_file():
        out.update(read_json(te))
    return out


@contextlib.contextmanager
def plan_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.kdlab-pipeline.lock`` (one process works on a plan folder at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_LOCK
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock
        yield
        return
    f = open_lock_file(path)
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise KdlabError(f"another kdlab sweep/chain is working in {out}; wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


@dataclass
class Outcome:
    task: Task
    status: str  # done | ran | failed | skipped | submitted | queued
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0
    job_id: str | None = None


def _line(i: int, n: int, task: Task, root: Path, outcome: Outcome) -> str:
    w = len(str(n))
    head = f"[{i:>{w}}/{n}] {outcome.status:<9} {task.rel(root)}"
    r = outcome.result
    if r is not None:
        def pct(key: str) -> str:
            return "n/a" if r.get(key) is None else f"{r[key]:.2f}%"

        top5 = f" (top-5 {pct('best_test_top5')})" if r.get("best_test_top5") is not None else ""
        return (f"{head}  test {pct('final_test_acc')}  best {pct('best_test_acc')}{top5}  "
                f"train {pct('train_eval_acc')}  ({outcome.seconds:.1f} s)")  # fmt: skip
    if outcome.job_id:
        head = f"{head}  job {outcome.job_id}"
    return f"{head}  {outcome.error or ''}".rstrip()


# --------------------------------------------------------------------------------------------------------------------
# runs as launcher tasks


def task_name(task: Task, root: Path) -> str:
    """The launch-task name of a run: its path in the plan folder, ``/`` replaced by ``__``."""
    return task.rel(root).replace(os.sep, "__")


def log_path(root: Path, task: Task) -> Path:
    return root / "logs" / f"{task_name(task, root)}.log"


def write_job(path: Path, cfg: RunConfig, out: Path, root: Path | None, kind: str) -> tuple[str, ...]:
    """Write a worker job file (``kind``: ``plan`` run with its train-split evaluation, or a plain ``run``) and
    return the command that runs it."""
    job = {"kind": kind, "config": cfg.to_dict(), "out": str(Path(out).absolute()),
           "root": None if root is None else str(Path(root).absolute())}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(job, indent=1))
    return (sys.executable, "-m", WORKER, str(path.absolute()))


def launch_tasks(todo: list[Task], root: Path, threads: int | None, active: dict[str, str],
                 write: bool = True) -> list[LaunchTask]:  # fmt: skip
    """The launcher tasks of the runs ``todo`` (each waits for its teacher runs among them, or their ``active`` jobs);
    ``write=False`` writes no job files (the tasks are for checking only)."""
    names = {t.key: task_name(t, root) for t in todo}
    out = []
    for t in todo:
        cfg = t.cfg.model_copy(deep=True)
        if cfg.train.threads is None:
            cfg.train.threads = threads or cfg.launcher.cpus_per_task
        name = names[t.key]
        job = root / LAUNCH_DIR / "jobs" / f"{name}.json"
        argv = write_job(job, cfg, t.out, root, "plan") if write else ("true",)
        after = tuple(names[s.key] for s in t.sources if s.key in names)
        after_jobs = tuple(active[n] for s in t.sources if (n := task_name(s, root)) in active)
        out.append(LaunchTask(name, argv, log_path(root, t), after, threads=cfg.train.threads, resources=cfg.launcher,
                              after_jobs=after_jobs))  # fmt: skip
    return out


def plan_launcher(tasks: Sequence[Task]) -> LauncherConfig:
    """The launcher section of a plan's runs: one launcher ``name`` for all (resources may differ per stage)."""
    names = sorted({t.cfg.launcher.name for t in tasks})
    if len(names) > 1:
        raise ConfigError(f"the runs of a plan name different launchers ({', '.join(names)}); give one, e.g. --launcher")
    return tasks[0].cfg.launcher if tasks else LauncherConfig()


def preflight(tasks: list[Task], root: Path, settings: LauncherConfig, jobs: int, threads: int | None) -> None:
    """Everything about the launcher that can be refused, before the plan folder is touched: its name, ``--jobs``
    with a non-local launcher, and (Slurm) whether the cluster accepts every distinct request."""
    launcher = get_launcher(settings, jobs=jobs, threads=threads)
    if settings.name != "local":
        launcher.check(launch_tasks(tasks, root, None, {}, write=False))


def active_jobs(tasks: Sequence[Task], root: Path) -> dict[str, str]:
    """Runs of the plan whose Slurm job (of an earlier submission) is still queued or running: name -> job id."""
    from kdlab.launch import records

    folder = root / LAUNCH_DIR
    if not (folder / records.TASKS).is_dir() or shutil.which("squeue") is None:
        return {}
    jobs = {}
    for t in tasks:
        sub = records.read_submitted(folder, task_name(t, root))
        if sub is not None and sub.launcher == "slurm" and sub.job_id:
            jobs[task_name(t, root)] = sub.job_id
    if not jobs:
        return {}
    from kdlab.launch import slurm_queue

    queued = slurm_queue.queue(list(jobs.values()))
    return {n: j for n, j in jobs.items() if j in queued}


def execute(
    tasks: list[Task],
    root: Path,
    jobs: int = 1,
    threads: int | None = None,
    log: Log = lambda m: None,
    verbose: bool = False,
) -> list[Outcome]:
    """Run every unfinished task here (teachers first); returns one :class:`Outcome` per task, in plan order.

    ``jobs == 1`` runs in this process; ``jobs > 1`` runs up to ``jobs`` worker processes (the local launcher), each
    limited to ``threads`` torch threads (default: CPU cores // jobs) unless the config sets ``train.threads``.
    """
    active = active_jobs(tasks, root)
    if active:
        ids = ", ".join(sorted(set(active.values()))[:5])
        raise KdlabError(f"{len(active)} run(s) of {root} are queued or running on Slurm (jobs {ids}); wait for them "
                         f"or cancel them with `kdlab sweep --cancel {root}`")  # fmt: skip
    status = {t.key: task_status(t) for t in tasks}
    outcomes: dict[tuple, Outcome] = {}
    n = len(tasks)
    counter = iter(range(1, n + 1))
    for t in tasks:
        if status[t.key] == "done":
            outcomes[t.key] = Outcome(t, "done", load_result(t.out))
            log(_line(next(counter), n, t, root, outcomes[t.key]))
    todo = [t for t in tasks if status[t.key] != "done"]
    if jobs <= 1:
        for t in todo:
            failed = next((s for s in t.sources if outcomes[s.key].status in ("failed", "skipped")), None)
            if failed is not None:
                outcomes[t.key] = Outcome(t, "skipped", error=f"teacher run {failed.rel(root)} failed")
            else:
                t0 = time.perf_counter()
                trainer_log = (lambda m: log("    " + m)) if verbose else None
                try:
                    ensure_teacher_cache(t.cfg, root, log)
                    res = run_task(t.cfg, t.out, resume=status[t.key] == "resume", log=trainer_log)
                    outcomes[t.key] = Outcome(t, "ran", res, seconds=time.perf_counter() - t0)
                except KdlabError as err:
                    outcomes[t.key] = Outcome(t, "failed", error=str(err), seconds=time.perf_counter() - t0)
            log(_line(next(counter), n, t, root, outcomes[t.key]))
        return [outcomes[t.key] for t in tasks]
    by_name = {task_name(t, root): t for t in tasks}
    launcher = get_launcher("local", jobs=jobs, threads=threads)

    def ended(end: TaskEnd) -> None:
        t = by_name[end.name]
        outcomes[t.key] = outcome_of(t, end, root, outcomes)
        log(_line(next(counter), n, t, root, outcomes[t.key]))

    launcher.submit(launch_tasks(todo, root, launcher.threads, {}), root / LAUNCH_DIR).wait(on_end=ended)
    return [outcomes[t.key] for t in tasks]


def outcome_of(t: Task, end: TaskEnd, root: Path, outcomes: dict[tuple, Outcome]) -> Outcome:
    """A run's :class:`Outcome` from its task's end (its results read from its folder); a run that did not start
    because a teacher run failed is ``skipped``."""
    if end.state == "done" and is_finished(t.out):
        return Outcome(t, "ran", load_result(t.out), seconds=end.seconds or 0.0, job_id=end.job_id)
    failed = next((s for s in t.sources if s.key in outcomes and outcomes[s.key].status in ("failed", "skipped")), None)
    if end.state in ("skipped", "cancelled") and failed is not None:
        return Outcome(t, "skipped", error=f"teacher run {failed.rel(root)} failed", job_id=end.job_id)
    return Outcome(t, "failed", error=end.error or f"ended {end.state}", seconds=end.seconds or 0.0, job_id=end.job_id)


TABLES_TASK = "tables"


def _cancel_old_tables_job(root: Path) -> None:
    """Cancel the tables job of an earlier submission that has not run yet (a new submission brings its own)."""
    from kdlab.launch import records, slurm_queue

    sub = records.read_submitted(root / LAUNCH_DIR, TABLES_TASK)
    if sub is not None and sub.launcher == "slurm" and sub.job_id and shutil.which("squeue") is not None:
        if sub.job_id in slurm_queue.queue([sub.job_id]):
            slurm_queue.cancel([sub.job_id])


def submit(
    tasks: list[Task],
    root: Path,
    settings: LauncherConfig,
    log: Log = lambda m: None,
    wait: bool = False,
    tables_argv: Sequence[str] | None = None,
) -> list[Outcome]:
    """Hand the unfinished runs to a non-local launcher (Slurm); with ``wait``, follow them to their ends.

    Runs whose job of an earlier submission is still queued or running are not submitted again (their students wait
    for those jobs). Without ``wait``, a last task (``tables_argv``, run whatever the others' ends) writes the tables.
    """
    launcher = get_launcher(settings)
    status = {t.key: task_status(t) for t in tasks}
    active = active_jobs(tasks, root)
    outcomes: dict[tuple, Outcome] = {}
    todo = []
    for t in tasks:
        name = task_name(t, root)
        if status[t.key] == "done":
            outcomes[t.key] = Outcome(t, "done", load_result(t.out))
        elif name in active:
            outcomes[t.key] = Outcome(t, "queued", job_id=active[name], error="(queued earlier)")
        else:
            todo.append(t)
    ltasks = launch_tasks(todo, root, None, active)
    if ltasks:
        _cancel_old_tables_job(root)  # superseded by this submission's own
    if ltasks and tables_argv is not None and not wait:
        res = (ltasks[0].resources or settings).model_copy(update={
            "gpus_per_node": 0, "nodes": 1, "tasks_per_node": 1, "additional": {},
            "time": min(10, settings.time_minutes or 10)})  # fmt: skip
        ltasks.append(LaunchTask(TABLES_TASK, tuple(tables_argv), root / "logs" / "tables.log",
                                 tuple(lt.name for lt in ltasks), after_jobs=tuple(sorted(set(active.values()))),
                                 resources=res, after_any=True))  # fmt: skip
    folder = root / LAUNCH_DIR
    sub = launcher.submit(ltasks, folder, job_name=f"kdlab:{root.name}") if ltasks else None
    by_name = {task_name(t, root): t for t in todo}
    for name, t in by_name.items():
        assert sub is not None
        outcomes[t.key] = Outcome(t, "submitted", job_id=sub.job_ids[name])
    n = len(tasks)
    for i, t in enumerate(tasks, 1):
        log(_line(i, n, t, root, outcomes[t.key]))
    if sub is not None and TABLES_TASK in sub.job_ids:
        log(f"job {sub.job_ids[TABLES_TASK]} writes the tables once every run has ended")
    if wait and sub is not None:
        counter = iter(range(1, len(todo) + 1))

        def ended(end: TaskEnd) -> None:
            t = by_name[end.name]
            outcomes[t.key] = outcome_of(t, end, root, outcomes)
            log(_line(next(counter), len(todo), t, root, outcomes[t.key]))

        sub.wait(on_end=ended)
    return [outcomes[t.key] for t in tasks]


# --------------------------------------------------------------------------------------------------------------------
# single commands submitted to a launcher (`kdlab train/distill/cache-teacher --launcher slurm`)

RUN_TASK = "run"  # the launch-task name of a single run (`kdlab train/distill --launcher slurm`)


def submit_command(settings: LauncherConfig, name: str, argv: Sequence[str], folder: Path, log: Path,
                   job_name: str) -> str:  # fmt: skip
    """Submit one command as one job of the launcher ``settings`` names, refusing while an earlier job of the same
    task in ``folder`` is still queued or running; returns the job id."""
    from kdlab.launch import records, slurm_queue

    launcher = get_launcher(settings)
    old = records.read_submitted(folder, name)
    if old is not None and old.launcher == "slurm" and old.job_id and old.job_id in slurm_queue.queue([old.job_id]):
        raise KdlabError(f"job {old.job_id} of {folder.parent} is still queued or running; wait for it or cancel it "
                         f"with `kdlab sweep --cancel {folder.parent}`")  # fmt: skip
    sub = launcher.submit([LaunchTask(name, tuple(argv), log)], folder, job_name=job_name)
    return sub.job_ids[name]


def submit_run(cfg: RunConfig, out: str | Path, *, resume: bool, overwrite: bool) -> str:
    """``kdlab train/distill --launcher slurm``: check the run folder as a local start does, then submit one job
    running the worker on it (a requeued job resumes); returns the job id. The job's log and records are in
    ``OUT/.kdlab-launch/``; ``kdlab sweep --status OUT`` follows it."""
    from kdlab.engine.resume import check_same_config
    from kdlab.engine.rundir import FolderLock, check_out_dir, clear_run
    from kdlab.launch.base import check_tasks

    out = Path(out).absolute()
    check_out_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        check_same_config(cfg, out)
    folder, existed = out / LAUNCH_DIR, out.exists()
    log = folder / f"{RUN_TASK}.log"
    launcher = get_launcher(cfg.launcher)
    preview = [LaunchTask(RUN_TASK, ("true",), log, resources=cfg.launcher)]
    check_tasks(preview)
    launcher.check(preview)  # Slurm installed, sbatch accepts the request: before the folder is touched
    try:
        with FolderLock(out):
            if overwrite:
                clear_run(out)
            argv = write_job(folder / "jobs" / f"{RUN_TASK}.json", cfg, out, None, "run")
            return submit_command(cfg.launcher, RUN_TASK, argv, folder, log, f"kdlab:{out.name}")
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise
