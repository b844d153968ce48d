"""Executing a plan: skip finished runs, resume interrupted ones, run the rest (in-process or ``--jobs`` workers).

A run of a plan is *finished* when its folder holds ``summary.json`` and ``train_eval.json`` (the accuracy on the
training split in eval mode, written right after the run by :func:`run_task`). A folder that is a kdlab run but not
finished is resumed exactly (``kdlab.engine`` checkpoints every epoch); a missing or empty folder is a new run.
Before anything runs, every existing folder's ``config.yaml`` is compared with the plan's config for it, so a sweep
never mixes runs of different settings. One plan folder is worked on by one process at a time (a lock file).

With ``jobs > 1`` each run is a ``python -m kdlab.pipelines.worker`` subprocess (its output goes to
``OUT/logs/``); a run starts once its teacher's run has finished, and a failed run fails the runs it teaches.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config import RunConfig, read_yaml, validate
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import entries, is_run_dir
from kdlab.errors import ConfigError, KdlabError
from kdlab.pipelines.plan import CACHE_DIR, Task, same_plan_cache
from kdlab.trust import child_env

TRAIN_EVAL = "train_eval.json"
#: keys that may differ between a run's saved config.yaml and the plan (they do not change results)
VOLATILE = {"train.progress", "train.threads", "train.device", "meta"}

Log = Callable[[str], None]


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / TRAIN_EVAL).is_file()


def task_status(task: Task) -> str:
    """``done`` | ``resume`` | ``new``; raises if the folder holds something else or a run of another config."""
    d = task.out
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
        if task.cfg.teacher is not None and old_cache != task.cfg.teacher.cache and same_plan_cache(old_cache, task.cfg.teacher.cache):
            task.cfg.teacher.cache = old_cache  # the run keeps the cache file it was made with (same teacher, views)
        diff = first_difference(saved, task.cfg.to_dict(), ignore)
        if diff:
            raise ConfigError(
                f"{d} holds a run made with a different '{diff}' than this plan asks for; "
                "use another --out (or delete that run)"
            )
    return status


def ensure_teacher_cache(task: Task, root: Path, log: Log = lambda m: None) -> None:
    """Build the plan-made teacher-output cache of ``task`` if it is missing or was made from other teacher weights."""
    cfg = task.cfg
    if cfg.teacher is None or not cfg.teacher.cache:
        return
    path = Path(cfg.teacher.cache)
    if path.parent != root / CACHE_DIR:
        return  # the user's own cache: used as given
    import torch

    from kdlab.data import build_dataset
    from kdlab.engine.fastpath import FastPath
    from kdlab.engine.teacher_cache import TeacherCache, build_cache
    from kdlab.engine.teachers import load_teacher, teacher_fingerprint
    from kdlab.engine.trainer import select_device
    from kdlab.methods import METHODS

    sha = teacher_fingerprint(cfg.teacher)
    if path.is_file():
        try:
            if TeacherCache(path).info.meta.get("teacher_sha256") == sha:
                return
        except KdlabError:
            pass
    t0 = time.perf_counter()
    device = select_device(cfg.train.device)
    data = build_dataset(cfg.data).to(device)
    teacher = load_teacher(cfg.teacher, data.num_classes).to(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    views = int((cfg.meta.get("pipeline") or {}).get("teacher_cache_views", 1))
    build_cache(
        teacher, data, views, path, augment_seed=cfg.data.augment_seed or 0,
        fields=METHODS.get(cfg.method.name).teacher_outputs, dtype=torch.float32, batch_size=cfg.train.eval_batch_size,
        meta={"teacher": cfg.teacher.name, "teacher_sha256": sha, "data": cfg.data.model_dump(mode="json")},
        fast=FastPath(cfg.train, device, data.example_batch(2)),  # the students' autocast / memory format
        fold_bn=cfg.teacher.fold_bn,
    )  # fmt: skip
    log(f"    teacher cache {path.relative_to(root)}: {views} view(s) ({time.perf_counter() - t0:.1f} s)")


def run_task(cfg: RunConfig, out: Path, resume: bool, log: Log | None = None) -> dict[str, Any]:
    """Run (or resume) one run of a plan, then record its training-split accuracy; returns its results."""
    from kdlab.engine import Trainer

    trainer = Trainer(cfg, out, resume=resume, log=log)
    summary = trainer.run().summary
    ev = trainer.evaluate("train")
    record = {"train_eval_acc": ev["acc"], "train_eval_loss": ev["loss"], "split": "train", "n": trainer.data.num_train}
    atomic_write_text(Path(out) / TRAIN_EVAL, json.dumps(record, indent=1))
    return {**summary, **record}


def load_result(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` merged with ``train_eval.json`` of a finished run."""
    out = json.loads((run_dir / "summary.json").read_text())
    te = run_dir / TRAIN_EVAL
    if te.is_file():
        out.update(json.loads(te.read_text()))
    return out


@contextlib.contextmanager
def plan_lock(out: Path) -> Iterator[None]:
    """Hold ``OUT/.kdlab-pipeline.lock`` (one process works on a plan folder at a time)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".kdlab-pipeline.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: no lock
        yield
        return
    f = open(path, "a+")
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
    status: str  # done | ran | failed | skipped
    result: dict[str, Any] | None = None
    error: str | None = None
    seconds: float = 0.0


def _line(i: int, n: int, task: Task, root: Path, outcome: Outcome) -> str:
    w = len(str(n))
    head = f"[{i:>{w}}/{n}] {outcome.status:<7} {task.rel(root)}"
    r = outcome.result
    if r is not None:
        top5 = f" (top-5 {r['best_test_top5']:.2f}%)" if r.get("best_test_top5") is not None else ""
        return (f"{head}  test {r['final_test_acc']:.2f}%  best {r['best_test_acc']:.2f}%{top5}  "
                f"train {r.get('train_eval_acc', float('nan')):.2f}%  ({outcome.seconds:.1f} s)")  # fmt: skip
    return f"{head}  {outcome.error or ''}".rstrip()


def execute(
    tasks: list[Task],
    root: Path,
    jobs: int = 1,
    threads: int | None = None,
    log: Log = lambda m: None,
    verbose: bool = False,
) -> list[Outcome]:
    """Run every unfinished task (teachers first); returns one :class:`Outcome` per task, in plan order.

    ``jobs == 1`` runs in this process; ``jobs > 1`` runs up to ``jobs`` worker subprocesses, each limited to
    ``threads`` torch threads (default: CPU cores // jobs) unless the config sets ``train.threads``.
    """
    status = {t.key: task_status(t) for t in tasks}
    outcomes: dict[tuple, Outcome] = {}
    n = len(tasks)
    counter = iter(range(1, n + 1))
    for t in tasks:
        if status[t.key] == "done":
            outcomes[t.key] = Outcome(t, "done", load_result(t.out))
            log(_line(next(counter), n, t, root, outcomes[t.key]))
    todo = [t for t in tasks if status[t.key] != "done"]

    def blocked(t: Task) -> str | None:
        for src in t.sources:
            o = outcomes.get(src.key)
            if o is not None and o.status in ("failed", "skipped"):
                return f"teacher run {src.rel(root)} failed"
        return None

    if jobs <= 1:
        for t in todo:
            why = blocked(t)
            if why:
                outcomes[t.key] = Outcome(t, "skipped", error=why)
            else:
                t0 = time.perf_counter()
                trainer_log = (lambda m: log("    " + m)) if verbose else None
                try:
                    ensure_teacher_cache(t, root, log)
                    res = run_task(t.cfg, t.out, resume=status[t.key] == "resume", log=trainer_log)
                    outcomes[t.key] = Outcome(t, "ran", res, seconds=time.perf_counter() - t0)
                except KdlabError as err:
                    outcomes[t.key] = Outcome(t, "failed", error=str(err), seconds=time.perf_counter() - t0)
            log(_line(next(counter), n, t, root, outcomes[t.key]))
    else:
        _execute_parallel(todo, status, outcomes, root, jobs, threads, log, counter, n, blocked)
    return [outcomes[t.key] for t in tasks]


def _log_path(root: Path, task: Task) -> Path:
    name = task.rel(root).replace(os.sep, "__")
    return root / "logs" / f"{name}.log"


def _execute_parallel(todo, status, outcomes, root, jobs, threads, log, counter, n, blocked) -> None:
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[Task, float, Any]] = {}
    (root / "logs").mkdir(parents=True, exist_ok=True)
    try:
        while pending or running:
            for t in list(pending):
                why = blocked(t)
                if why:
                    pending.remove(t)
                    outcomes[t.key] = Outcome(t, "skipped", error=why)
                    log(_line(next(counter), n, t, root, outcomes[t.key]))
                    continue
                if len(running) >= jobs:
                    break
                if any(src.key not in outcomes for src in t.sources):
                    continue  # a teacher of it is still to run
                try:
                    ensure_teacher_cache(t, root, log)
                except KdlabError as err:
                    pending.remove(t)
                    outcomes[t.key] = Outcome(t, "failed", error=str(err))
                    log(_line(next(counter), n, t, root, outcomes[t.key]))
                    continue
                pending.remove(t)
                cfg = t.cfg.model_copy(deep=True)
                if cfg.train.threads is None:
                    cfg.train.threads = threads
                job = {"config": cfg.to_dict(), "out": str(t.out), "resume": status[t.key] == "resume"}
                logf = open(_log_path(root, t), "a")
                env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(cfg.train.threads), **child_env())
                proc = subprocess.Popen(
                    [sys.executable, "-m", "kdlab.pipelines.worker"], stdin=subprocess.PIPE, stdout=logf,
                    stderr=subprocess.STDOUT, env=env, text=True,
                )  # fmt: skip
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(job))
                proc.stdin.close()
                running[proc] = (t, time.perf_counter(), logf)
            done = [p for p in running if p.poll() is not None]
            if not done:
                time.sleep(0.1)
                continue
            for p in done:
                t, t0, logf = running.pop(p)
                logf.close()
                dt = time.perf_counter() - t0
                if p.returncode == 0 and is_finished(t.out):
                    outcomes[t.key] = Outcome(t, "ran", load_result(t.out), seconds=dt)
                else:
                    outcomes[t.key] = Outcome(t, "failed", error=_last_error(_log_path(root, t), p.returncode), seconds=dt)
                log(_line(next(counter), n, t, root, outcomes[t.key]))
    except BaseException:
        for p in running:
            p.terminate()
        for p in running:
            with contextlib.suppress(Exception):
                p.wait(timeout=30)
        raise


def _last_error(path: Path, code: int) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    msg = next((ln for ln in reversed(lines) if ln.startswith("kdlab: error:")), None)
    if msg:
        return msg[len("kdlab: error:") :].strip()
    tail = lines[-1] if lines else ""
    return f"worker exited with code {code}: {tail[:200]} (log: {path})"
