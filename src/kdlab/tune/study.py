"""The study folder of ``kdlab tune``: its spec, the Optuna study in a journal file, and who runs which trial.

``OUT/tune.json`` holds the spec (:class:`TuneSpec`: the trials' base config, the space, sampler, pruner and
objective). A rerun must ask for the same study (``--trials`` may grow or shrink; ``--parallel`` and the launcher
may change); anything else is refused. ``OUT/study.journal`` is Optuna's :class:`~optuna.storages.JournalStorage` in
one append-only file whose writers take a lock file (a symlink, atomic on NFS), so local worker processes and Slurm
jobs on other nodes share one study through a shared folder.

Workers take trials one at a time inside :func:`claim` (``flock`` on ``OUT/claim.lock``): they first hand back the
trials of dead workers, then take a waiting trial or ask the sampler for a new one while fewer than ``trials`` are
counted (a stale symlink lock would stall every worker for its grace period after a kill; ``flock`` dies with its
holder). A worker
is alive while it holds ``flock`` on ``OUT/workers/ID.lock`` (the lock kdlab's run folders use; the kernel, or the
NFS server's lease, drops it when the process dies). A RUNNING trial whose worker is dead is marked FAIL and queued
again with the same parameters and the same run folder, so the next worker *resumes* its run from the last epoch
checkpoint (a killed or preempted trial loses at most one epoch, never reruns from scratch). The failed record stays
in the study (``retry_of`` on its successor links them) and is not counted among the ``trials``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import open_lock_file, waiting_lock
from kdlab.errors import ConfigError, KdlabError
from kdlab.registry import Registry
from kdlab.seeding import derive_seed

SPEC = "tune.json"
JOURNAL = "study.journal"
STUDY_NAME = "kdlab-tune"
TRIALS_DIR = "trials"
WORKERS_DIR = "workers"
FORMAT = 1
#: spec fields a rerun may change (the launcher section never changes results; the number of random start-up trials
#: follows --trials by default)
MAY_CHANGE = ("trials", "startup_trials", "recipe_path", "base.launcher", "recipe.launcher")
#: the row key reported to the pruner after every epoch
REPORTED = "val_acc"
#: summary.json keys of the two objectives
OBJECTIVES = {"final": "final_val_acc", "best": "best_val_acc"}


@dataclass
class TuneSpec:
    """What a study searches: written once to ``OUT/tune.json``, read by every worker."""

    base: dict[str, Any]  # the trials' raw config: recipe + overrides + the val split, test closed
    recipe: dict[str, Any]  # the recipe + overrides as given (the best trial's recipe starts from it)
    space: list[str]
    trials: int
    objective: str = "final"  # final | best: the val top-1 of the last epoch, or of the best epoch
    sampler: str = "tpe"
    seed: int = 0
    startup_trials: int = 10
    pruner: str = "median"
    pruner_startup: int = 5
    pruner_warmup: int = 0
    recipe_path: str = ""
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, out: Path) -> None:
        atomic_write_text(out / SPEC, json.dumps(asdict(self), indent=1, sort_keys=True))

    @classmethod
    def load(cls, out: Path) -> TuneSpec:
        from kdlab.fileio import read_json

        path = out / SPEC
        if not path.is_file():
            raise KdlabError(f"{out} holds no kdlab tune study ({SPEC} is missing)")
        try:
            return cls(**read_json(path))
        except (ValueError, TypeError) as err:
            raise KdlabError(f"{path} is not a kdlab tune spec: {err}") from None

    def first_difference(self, other: TuneSpec) -> str | None:
        """The first field (other than :data:`MAY_CHANGE`) in which two specs differ, else ``None``."""
        from kdlab.engine.resume import first_difference

        return first_difference(asdict(self), asdict(other), set(MAY_CHANGE))


# --------------------------------------------------------------------------------------------------------------------
# samplers and pruners (registries: one entry per name)

SAMPLERS: Registry[Callable[[TuneSpec, int], Any]] = Registry("sampler")
PRUNERS: Registry[Callable[[TuneSpec], Any]] = Registry("pruner")


def _tpe(spec: TuneSpec, seed: int) -> Any:
    import optuna

    # constant_liar: a trial still running counts as a poor result, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True)


def _random(spec: TuneSpec, seed: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS.add("tpe", _tpe)
SAMPLERS.add("random", _random)


def _median(spec: TuneSpec) -> Any:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup, n_warmup_steps=spec.pruner_warmup)


def _halving(spec: TuneSpec) -> Any:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=spec.pruner_warmup or "auto")


def _hyperband(spec: TuneSpec) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(min_resource=max(1, spec.pruner_warmup))


def _nop(spec: TuneSpec) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


PRUNERS.add("median", _median)
PRUNERS.add("halving", _halving)
PRUNERS.add("hyperband", _hyperband)
PRUNERS.add("none", _nop)


# --------------------------------------------------------------------------------------------------------------------
# the study


def quiet_optuna() -> None:
    """Optuna's per-trial INFO lines and experimental-feature warnings off (kdlab prints its own lines)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _storage(out: Path) -> Any:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / JOURNAL)))


def open_study(out: Path, spec: TuneSpec, sampler_seed: int | None = None, create: bool = False) -> Any:
    """The study of ``out`` with the spec's sampler (seeded with ``sampler_seed``) and pruner."""
    import optuna

    quiet_optuna()
    seed = (derive_seed(spec.seed, "sampler") if sampler_seed is None else sampler_seed) % 2**32
    sampler, pruner = SAMPLERS.get(spec.sampler)(spec, seed), PRUNERS.get(spec.pruner)(spec)
    if create:
        return optuna.create_study(storage=_storage(out), study_name=STUDY_NAME, direction="maximize",
                                   sampler=sampler, pruner=pruner, load_if_exists=True)  # fmt: skip
    try:
        return optuna.load_study(storage=_storage(out), study_name=STUDY_NAME, sampler=sampler, pruner=pruner)
    except KeyError:
        raise KdlabError(f"{out / JOURNAL} holds no study '{STUDY_NAME}'") from None


def claim(out: Path) -> contextlib.AbstractContextManager[None]:
    """The study's claim lock: ``flock`` on ``OUT/claim.lock``, waiting for it. Like kdlab's run-folder lock it dies
    with its holder (a worker killed while claiming never blocks the others; NFSv4 keeps such locks on the server)."""
    return waiting_lock(out / "claim.lock")


class WorkerLock:
    """``OUT/workers/ID.lock`` under ``flock`` for the worker's lifetime: the worker is alive while it is held."""

    def __init__(self, out: Path) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = out / WORKERS_DIR / f"{self.id}.lock"
        self._file: IO[str] | None = None

    def __enter__(self) -> WorkerLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_lock_file(self.path)
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)


def worker_alive(out: Path, worker: str | None) -> bool:
    """Whether the worker ``worker`` still holds its lock (a worker never recorded is not alive)."""
    import fcntl

    if not worker:
        return False
    path = out / WORKERS_DIR / f"{worker}.lock"
    try:
        f = open_lock_file(path, create=False)
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
    path.unlink(missing_ok=True)  # a dead worker's lock file: nobody will take it again
    return False


def replaced(trials: list[Any]) -> set[int]:
    """Numbers of trials that were queued again (their successor's ``retry_of``)."""
    return {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}


def counted(trials: list[Any]) -> list[Any]:
    """The trials that count towards ``--trials``: all but those queued again."""
    gone = replaced(trials)
    return [t for t in trials if t.number not in gone]


def requeue_dead(study: Any, out: Path) -> list[int]:
    """Mark the RUNNING trials of dead workers FAIL and queue each again (same parameters, same run folder); call
    under :func:`claim`. Returns the numbers of the trials queued again."""
    from optuna.trial import TrialState

    again = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_alive(out, t.user_attrs.get("worker")):
            continue
        attrs = {"retry_of": t.number}
        if "run_dir" in t.user_attrs:
            attrs["run_dir"] = t.user_attrs["run_dir"]
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs=attrs)
        again.append(t.number)
    return again


def trial_dir_name(number: int) -> str:
    return f"{TRIALS_DIR}/trial-{number:04d}"


def check_study_folder(out: Path, spec: TuneSpec) -> bool:
    """Refuse an ``--out`` that holds something else or another study; ``True`` when it holds this study."""
    if out.exists() and not out.is_dir():
        raise KdlabError(f"output path {out} exists and is not a folder")
    if (out / SPEC).is_file():
        old = TuneSpec.load(out)
        diff = old.first_difference(spec)
        if diff is not None:
            raise ConfigError(f"{out} holds a study with a different '{diff}'; use another --out to search anew "
                              "(a rerun may change only --trials, --parallel and the launcher)")  # fmt: skip
        return True
    if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise KdlabError(f"output folder {out} is not empty and holds no kdlab tune study; choose another --out")
    return False


def trial_line(t: Any, note: str = "") -> str:
    """``trial   3 complete  method.temperature=3.2 …  val 71.25%  (12.3 s)``: one finished trial."""
    values = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    if not note:
        note = t.user_attrs.get("error") or t.user_attrs.get("stopped") or ""
        if t.state.name == "COMPLETE":
            note = f"val {t.value:.2f}%"
        elif t.state.name == "FAIL" and not note:
            note = "interrupted (its worker died; queued again)"
        elif t.state.name == "PRUNED" and not note:
            note = f"pruned at epoch {max(t.intermediate_values)}" if t.intermediate_values else "pruned"
    again = f" (resumed trial {t.user_attrs['retry_of']})" if "retry_of" in t.user_attrs else ""
    secs = t.user_attrs.get("seconds")
    took = f"  ({secs:.1f} s)" if secs is not None else ""
    return f"trial {t.number:>3} {t.state.name.lower():<8} {values}  {note}{again}{took}"
