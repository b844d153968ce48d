"""A tune worker: takes trials from the shared study one at a time and runs each as an ordinary kdlab run.

``kdlab tune --worker OUT`` (what ``--parallel`` starts locally and what each Slurm job runs) loops: claim a trial
(:mod:`kdlab.tune.study`), run it in this process into ``OUT/trials/trial-NNNN/`` with the trial's parameters set
in the recipe, report its val accuracy after every epoch to the pruner, and tell the study how it ended:

* COMPLETE with the objective (the val top-1 of the last epoch, or of the best one);
* PRUNED when the pruner stops it (after that epoch's checkpoint: ``kdlab train --resume`` can continue it) or when
  its loss turned non-finite (a diverged trial is a bad trial, not a broken one);
* FAIL with the error line when it cannot run (e.g. a value the method refuses); three failures in a row stop
  the worker with that error.

A trial queued again after its worker died resumes its run folder: its earlier epochs are reported to the pruner
from ``metrics.jsonl`` and training continues from the last checkpoint. SIGTERM (``kill``, Slurm preemption) leaves
the running trial RUNNING; whoever claims next finds its worker dead and queues it again.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.config import RunConfig, read_yaml, set_dotted, validate
from kdlab.engine.callbacks import Callback
from kdlab.errors import KdlabError
from kdlab.seeding import derive_seed
from kdlab.tune.space import Param, parse_space
from kdlab.tune.study import (
    OBJECTIVES, REPORTED, TuneSpec, WorkerLock, claim, counted, open_study, requeue_dead, trial_dir_name, trial_line,
)

if TYPE_CHECKING:
    from kdlab.engine.trainer import Trainer

MAX_FAILURES_IN_A_ROW = 3

Log = Callable[[str], None]


def trial_config(spec: TuneSpec, params: list[Param], values: dict[str, Any], number: int) -> RunConfig:
    """A trial's config: the spec's base with each searched key set to the trial's value."""
    raw = copy.deepcopy(spec.base)
    for p in params:
        if p.key in values:
            set_dotted(raw, p.key.split("."), p.value(values[p.key]), f"--space '{p.text}'")
    meta = raw.setdefault("meta", {})
    if isinstance(meta, dict):
        meta["tune"] = {"trial": number, "params": {p.key: p.value(values[p.key]) for p in params if p.key in values}}
    return validate(raw)


class ReportToPruner(Callback):
    """Reports each epoch's val top-1 to the Optuna trial; stops the run after the checkpoint of an epoch at which
    the pruner says so (:class:`optuna.TrialPruned`)."""

    def __init__(self, trial: Any) -> None:
        self.trial = trial
        self.prune_at: int | None = None
        self.last = float("nan")

    def on_train_start(self, trainer: Trainer) -> None:
        """A resumed trial: report the epochs that ran before (its ``metrics.jsonl`` as the trainer restored it)."""
        from kdlab.engine.rundir import read_metrics

        for row in read_metrics(trainer.out):
            if row["epoch"] > 0 and REPORTED in row:
                self.trial.report(row[REPORTED], row["epoch"])

    def on_epoch_row(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if row["epoch"] > 0:  # a method's pre-phase (epochs <= 0) is not reported
            self.last = row[REPORTED]
            self.trial.report(row[REPORTED], row["epoch"])
            if self.trial.should_prune():
                self.prune_at = row["epoch"]

    def on_checkpoint(self, trainer: Trainer, epoch: int) -> None:
        if self.prune_at is not None:
            import optuna

            raise optuna.TrialPruned(f"pruned at epoch {self.prune_at}")


@dataclass
class Claimed:
    trial: Any
    values: dict[str, Any]
    run_dir: Path
    retry_of: int | None


def claim_next(study: Any, spec: TuneSpec, params: list[Param], out: Path, worker: str) -> Claimed | None:
    """The next trial for this worker (``None`` when the study has all its trials)."""
    from optuna.trial import TrialState

    with claim(out):
        requeue_dead(study, out)
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if not waiting and len(counted(trials)) >= spec.trials:
            return None
        trial = study.ask({p.key: p.distribution() for p in params})
        attrs = trial.user_attrs
        run_dir = attrs.get("run_dir") or trial_dir_name(trial.number)
        trial.set_user_attr("worker", worker)
        trial.set_user_attr("run_dir", run_dir)
    return Claimed(trial, dict(trial.params), out / run_dir, attrs.get("retry_of"))


def run_trial(job: Claimed, study: Any, spec: TuneSpec, params: list[Param], log: Log) -> str:
    """Run one claimed trial to its end and tell the study; returns its state name."""
    import optuna
    from optuna.trial import TrialState

    from kdlab.engine.trainer import NonFiniteLossError, Trainer

    trial, t0 = job.trial, time.perf_counter()
    report = ReportToPruner(trial)
    resume = job.retry_of is not None and (job.run_dir / "config.yaml").is_file()
    state, value, note = TrialState.FAIL, None, ""
    try:
        if resume:  # the run of a dead worker, continued from its last checkpoint
            cfg = validate(read_yaml(job.run_dir / "config.yaml"))
        else:
            cfg = trial_config(spec, params, job.values, trial.number)
        cfg.train.progress = False
        trainer = Trainer(cfg, job.run_dir, resume=resume, callbacks=[report])
        summary = trainer.run().summary
        state, value = TrialState.COMPLETE, summary[OBJECTIVES[spec.objective]]
        note = f"val {value:.2f}%"
    except optuna.TrialPruned as err:
        state, note = TrialState.PRUNED, f"{err} (val {report.last:.2f}%)"
    except NonFiniteLossError as err:
        state, note = TrialState.PRUNED, f"diverged: {err}"
        trial.set_user_attr("stopped", note)
    except KdlabError as err:
        note = str(err)
        trial.set_user_attr("error", note)
    except Exception as err:  # a bug shows as the trial's error; the worker goes on (and stops after 3 in a row)
        note = f"internal error ({type(err).__name__}: {err})"
        trial.set_user_attr("error", note)
    trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))
    study.tell(trial, value, state=state)
    log(trial_line(study.trials[trial.number], note))
    return state.name


def run_worker(out: Path, index: int = 0, threads: int | None = None, log: Log | None = None) -> int:
    """Run trials of the study in ``out`` until it has all of them; returns how many this worker ran.

    ``index`` tells parallel workers apart: with the number of trials already in the study it seeds this worker's
    sampler, so a single worker draws the same points on every machine and parallel ones (or a rerun) differ."""
    from optuna.trial import TrialState

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if threads:
        import torch

        torch.set_num_threads(threads)
    spec = TuneSpec.load(out)
    params = parse_space(spec.space)
    done = failures = 0
    with WorkerLock(out) as me:
        study = open_study(out, spec)
        seed = derive_seed(spec.seed, "sampler", index, len(study.get_trials(deepcopy=False)))
        study = open_study(out, spec, seed)
        while (job := claim_next(study, spec, params, out, me.id)) is not None:
            state = run_trial(job, study, spec, params, log)
            done += 1
            failures = failures + 1 if state == TrialState.FAIL.name else 0
            if failures >= MAX_FAILURES_IN_A_ROW:
                error = study.trials[job.trial.number].user_attrs.get("error", "")
                raise KdlabError(f"{failures} trials in a row failed; the last: {error}")
    return done
