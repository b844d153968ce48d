"""``kdlab tune``: the study is set up here, workers run it (in this process, local processes or Slurm jobs), and
the report is written from the study when they end.

Nothing is written before the whole spec is checked: the recipe and overrides, the space's grammar, and the recipe
with each searched key at the ends of its range (a key the config lacks, a value it refuses: one line, exit 2).
Trials never read the test split: their config has ``data.read_test=false`` and a val split (the recipe's
``data.val_split``, else :data:`DEFAULT_VAL_SPLIT`) held out of the training set.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.config import (
    LauncherConfig, apply_overrides, parse_override, read_recipe, set_dotted, smoke_overrides, validate,
)  # fmt: skip
from kdlab.errors import ConfigError, KdlabError, UsageError
from kdlab.tune.space import Param, parse_space
from kdlab.tune.study import TuneSpec, check_study_folder, open_study, trial_line

#: the val split of trials whose recipe sets none (a fraction of the training set)
DEFAULT_VAL_SPLIT = 0.1
LOGS = "logs"

Log = Callable[[str], None]


@dataclass
class SearchOptions:
    """How to search (the spec's fields other than the configs and the space)."""

    trials: int
    objective: str = "final"
    sampler: str = "tpe"
    seed: int = 0
    startup_trials: int | None = None  # default: a third of the trials, between 2 and 10
    pruner: str = "median"
    pruner_startup: int = 5
    pruner_warmup: int = 0


def build_spec(recipe: str, overrides: list[str], space: list[str], opts: SearchOptions) -> tuple[TuneSpec, list[Param]]:
    """Read and check everything a study needs; writes nothing."""
    from kdlab.tune.study import PRUNERS, SAMPLERS

    SAMPLERS.get(opts.sampler), PRUNERS.get(opts.pruner)
    params = parse_space(space)
    overridden = {".".join(parse_override(o)[0]) for o in overrides if "=" in o}
    both = next((p.key for p in params if p.key in overridden), None)
    if both:
        raise UsageError(f"'{both}' is both overridden and searched; drop one of them")
    raw = apply_overrides(read_recipe(recipe), list(overrides) + smoke_overrides())
    cfg = validate(raw)
    base = copy.deepcopy(raw)
    if not cfg.data.val_split:
        set_dotted(base, ["data", "val_split"], DEFAULT_VAL_SPLIT, "kdlab tune")
    set_dotted(base, ["data", "read_test"], False, "kdlab tune")
    validate(base)
    for p in params:  # each searched key at the ends of its range (every value of a choice)
        for value in p.corners():
            trial = copy.deepcopy(base)
            set_dotted(trial, p.key.split("."), value, f"--space '{p.text}'")
            try:
                validate(trial)
            except ConfigError as err:
                raise ConfigError(f"--space '{p.text}' at {p.key}={value!r}: {err}") from None
    startup = opts.startup_trials if opts.startup_trials is not None else max(2, min(10, opts.trials // 3))
    spec = TuneSpec(base=base, recipe=raw, space=[p.text for p in params], trials=opts.trials,
                    objective=opts.objective, sampler=opts.sampler, seed=opts.seed, startup_trials=startup,
                    pruner=opts.pruner, pruner_startup=opts.pruner_startup, pruner_warmup=opts.pruner_warmup,
                    recipe_path=str(recipe))  # fmt: skip
    return spec, params


def _watch(out: Path, spec: TuneSpec, log: Log, stop: threading.Event) -> None:
    """Log each trial as it finishes (the workers run elsewhere), until ``stop`` is set."""
    seen = {t.number for t in open_study(out, spec).get_trials(deepcopy=False) if t.state.is_finished()}
    study = open_study(out, spec)
    while not stop.wait(2.0):
        for t in study.get_trials(deepcopy=False):
            if t.state.is_finished() and t.number not in seen:
                seen.add(t.number)
                log(trial_line(t))


def _worker_tasks(out: Path, parallel: int) -> list[Any]:
    from kdlab.launch import LaunchTask, kdlab_argv

    where = str(out.resolve())
    return [LaunchTask(f"tune-worker-{i}", kdlab_argv("tune", "--worker", where, "--worker-index", str(i)),
                       out / LOGS / f"worker-{i}.log") for i in range(parallel)]  # fmt: skip


def launcher_for(out: Path, parallel: int, launcher: LauncherConfig, threads: int | None) -> tuple[Any, list[Any]]:
    """The launcher of ``parallel`` workers and their tasks, checked (Slurm missing, sbatch refusing the request:
    one-line errors, nothing submitted or written)."""
    from kdlab.launch import get_launcher

    jobs = parallel if launcher.name == "local" else 1
    runner, tasks = get_launcher(launcher, jobs=jobs, threads=threads), _worker_tasks(out, parallel)
    runner.check(tasks)
    return runner, tasks


def earlier_workers(out: Path) -> set[str]:
    """Workers of an earlier `kdlab tune` on this study that are still running (or, on Slurm, queued): a killed
    coordinator leaves them working, and a rerun neither starts them twice nor reports before they end."""
    from kdlab.launch import LAUNCH_DIR
    from kdlab.launch.status import task_statuses

    if not (out / LAUNCH_DIR).is_dir():
        return set()
    statuses, _ = task_statuses(out / LAUNCH_DIR)
    # a local task never started stays "pending" in the records: only a Slurm job (with an id) is really queued
    return {n for n, st in statuses.items() if st.state == "running" or (st.state == "pending" and st.job_id)}


def _wait_for(out: Path, names: set[str], log: Log) -> None:
    if names:
        log(f"tune: waiting for the earlier workers {', '.join(sorted(names))}")
    while names:
        time.sleep(float(os.environ.get("KDLAB_SLURM_POLL_S", "5")))
        names = names & earlier_workers(out)


@contextlib.contextmanager
def _watching(out: Path, spec: TuneSpec, log: Log) -> Iterator[None]:
    """Log each trial as workers elsewhere finish it, while the block runs."""
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(out, spec, log, stop), daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=10)


def run_workers(out: Path, spec: TuneSpec, parallel: int, launcher: LauncherConfig, threads: int | None,
                log: Log) -> list[str]:  # fmt: skip
    """Run the study's workers to their end (and those of an earlier launch that still run); returns the error lines
    of workers that failed."""
    earlier = earlier_workers(out)
    if parallel == 1 and launcher.name == "local":
        from kdlab.tune.worker import run_worker

        try:
            run_worker(out, 0, threads, log)
        except KdlabError as err:  # the report is still written, the error ends the command
            return [f"worker: {err}"]
        with _watching(out, spec, log):
            _wait_for(out, earlier, log)
        return []
    from kdlab.launch import LAUNCH_DIR

    runner, tasks = launcher_for(out, parallel, launcher, threads)
    tasks = [t for t in tasks if t.name not in earlier]
    ends = {}
    with _watching(out, spec, log):
        if tasks:
            sub = runner.submit(tasks, out / LAUNCH_DIR)
            ids = f" (jobs {', '.join(sorted(set(sub.job_ids.values())))})" if sub.job_ids else ""
            log(f"tune: {len(tasks)} {launcher.name} workers{ids}; logs in {out / LOGS}")
            ends = sub.wait()
        _wait_for(out, earlier, log)
    return [f"{e.name} {e.state}: {e.error}" for e in ends.values() if e.state != "done"]


def run_tune(spec: TuneSpec, params: list[Param], out: Path, *, parallel: int = 1,
             launcher: LauncherConfig | None = None, threads: int | None = None,
             log: Log = lambda m: None) -> list[Path]:  # fmt: skip
    """Create (or continue) the study in ``out``, run its workers, write the report; returns the files written."""
    from optuna.trial import TrialState

    from kdlab.engine.rundir import FolderLock
    from kdlab.tune.report import write_report
    from kdlab.tune.study import counted

    launcher = launcher or LauncherConfig()
    again = check_study_folder(out, spec)
    if not (spec.recipe.get("data") or {}).get("val_split"):  # said once the folder is accepted
        log(f"tune: data.val_split={DEFAULT_VAL_SPLIT} (the recipe sets none): {DEFAULT_VAL_SPLIT:.0%} of the "
            "training set is held out and every trial is measured on it")  # fmt: skip
    with FolderLock(out):  # one `kdlab tune` per study folder (its workers take trials under the claim lock)
        spec.save(out)
        study = open_study(out, spec, create=True)
        n = len(counted(study.get_trials(deepcopy=False)))
        if again:
            log(f"tune: continuing the study in {out} ({n} of {spec.trials} trials there)")
        failed = run_workers(out, spec, parallel, launcher, threads, log)
        written = write_report(study, spec, params, out)
    trials = study.get_trials(deepcopy=False)
    left = [t for t in counted(trials) if not t.state.is_finished()]
    if failed or left or len(counted(trials)) < spec.trials:
        why = "; ".join(failed) if failed else f"{len(left)} trials unfinished"
        raise KdlabError(f"the study in {out} is not complete ({why}); rerun the same command to continue it")
    if not any(t.state == TrialState.COMPLETE for t in trials):
        raise KdlabError(f"no trial of the study in {out} completed; see {out / 'results.md'}")
    return written
