"""Experiment trackers (TensorBoard, Weights & Biases, MLflow): mirrors of ``metrics.jsonl``.

A tracker is a :class:`~kdlab.engine.callbacks.Callback` that receives every epoch row exactly as it is appended to
``metrics.jsonl`` (every loss term, lr, top-1 / top-5, the instruments' scalars) and logs its numbers with the epoch
as the step. Nothing in the training loop knows which trackers exist. They are enabled in the ``logging`` section of
a config::

    logging:
      tensorboard: true                                  # event files in RUN/tensorboard/
      wandb: {project: my-kd, mode: offline}             # RUN/wandb/ (offline) or uploaded (online)
      mlflow: {tracking_uri: "sqlite:///mlflow.db", experiment: kdlab}

The packages are optional (``pip install 'kdlab[trackers]'``), imported only when a tracker is enabled, and checked
before the run folder is touched. Only rank 0 of a distributed run logs. A resumed run continues at its next epoch:
TensorBoard appends to the same folder, wandb and MLflow open a new run whose steps continue the old one.

Trackers are mirrors: ``metrics.jsonl`` is the record. A tracker that fails — cannot start, raises while logging or
closing, its TensorBoard folder removed mid-run (the writer thread's error included) — is one ``kdlab: warning:``
line; the tracker stops and the run goes on to its normal end and exit code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlab.engine.callbacks import Callback
from kdlab.errors import ConfigError, warn
from kdlab.registry import Registry

if TYPE_CHECKING:
    from kdlab.config import LoggingConfig
    from kdlab.engine.trainer import Trainer


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics row that a tracker logs: every int / float except ``epoch`` (the step)."""
    return {
        k: float(v) for k, v in row.items()
        if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }  # fmt: skip


class Tracker(Callback):
    """Base class: :meth:`open` on rank 0 before the first epoch, :meth:`log` per row, :meth:`close` at the end."""

    #: the config key under ``logging`` and the importable package the tracker needs
    key: str = ""
    package: str = ""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.active = False

    def setup(self, trainer: Trainer) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(
                f"logging.{self.key} needs the '{self.package}' package: pip install 'kdlab[trackers]' "
                f"(or pip install {self.package})"
            )

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            self.active = True
            self._guard("could not start", self.open, trainer)

    def on_epoch_row(self, trainer: Trainer, row: dict[str, Any]) -> None:
        if self.active:
            self._guard("failed", self.log, scalars(row), int(row["epoch"]))

    def on_train_end(self, trainer: Trainer) -> None:
        if self.active:
            self._guard("failed at the end", self.close)
            self.active = False

    def _guard(self, what: str, call: Callable[..., None], *args: Any) -> None:
        """``call(*args)``; a failure of the tracker (any exception, not an interrupt) is one warning line, after
        which this tracker is off and its resources are let go without raising."""
        try:
            call(*args)
        except Exception as err:
            self.active = False
            first = (str(err).strip().splitlines() or [""])[0][:200]
            warn(f"logging.{self.key} {what} ({type(err).__name__}: {first}); the run goes on without it "
                 "(metrics.jsonl is the record)")  # fmt: skip
            with contextlib.suppress(Exception):
                self.abandon()

    def abandon(self) -> None:
        """After a failure: release what :meth:`open` took, ignoring errors (default: :meth:`close`)."""
        self.close()

    def open(self, trainer: Trainer) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


TRACKERS: Registry[type[Tracker]] = Registry("tracker")


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard event files in ``RUN/tensorboard/`` (one scalar tag per metrics.jsonl column)."""

    key, package = "tensorboard", "tensorboard"

    def open(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, TensorBoard drops what an interrupted epoch logged after the last kept metrics row
        purge = _last_epoch(trainer.out) + 1 if trainer.resume else None
        before = set(threading.enumerate())
        self._hook = threading.excepthook
        self.writer = SummaryWriter(log_dir=str(trainer.out / "tensorboard"), purge_step=purge)
        # the writer's own thread (it writes the event file): its failure is reported here in one line, from the
        # main thread, instead of as a traceback printed by the thread
        self._threads = set(threading.enumerate()) - before
        self._thread_errors: list[BaseException] = []
        threading.excepthook = self._thread_failed

    def _thread_failed(self, args: threading.ExceptHookArgs) -> None:
        if args.thread in self._threads and args.exc_value is not None:
            self._thread_errors.append(args.exc_value)
        else:
            self._hook(args)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()
        self._raise_thread_error()

    def close(self) -> None:
        try:
            self.writer.close()
            self._raise_thread_error()
        finally:
            for t in self._threads:  # a thread that failed has run its excepthook once joined
                t.join(timeout=10)
            if threading.excepthook == self._thread_failed:
                threading.excepthook = self._hook

    def _raise_thread_error(self) -> None:
        if self._thread_errors:
            raise self._thread_errors[0]


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run (offline: written to ``RUN/wandb/``, sync later with ``wandb sync``)."""

    key, package = "wandb", "wandb"

    def open(self, trainer: Trainer) -> None:
        import wandb

        o = self.options
        self.run = wandb.init(
            project=o.project, entity=o.entity, mode=o.mode, dir=str(trainer.out), name=trainer.out.name,
            config=trainer.cfg.to_dict(), reinit="create_new",
        )  # fmt: skip

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run in ``experiment`` at ``tracking_uri`` (the client API: no global active-run state)."""

    key, package = "mlflow", "mlflow"

    def open(self, trainer: Trainer) -> None:
        from mlflow.tracking import MlflowClient

        o = self.options
        self.client = MlflowClient(tracking_uri=o.tracking_uri)
        exp = self.client.get_experiment_by_name(o.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(o.experiment)
        self.run_id = self.client.create_run(exp_id, run_name=trainer.out.name).info.run_id
        params = [_param(k, v) for k, v in _flatten(trainer.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in finite.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _last_epoch(run_dir: Path) -> int:
    """The last epoch kept in ``metrics.jsonl`` (rows after the last checkpoint are already dropped on resume)."""
    from kdlab.engine.rundir import read_metrics  # engine.rundir imports nothing of the trackers

    return max([0, *(row["epoch"] for row in read_metrics(run_dir))])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value)[:500])


def build_trackers(cfg: LoggingConfig) -> list[Tracker]:
    """One tracker per enabled entry of the config's ``logging`` section."""
    return [TRACKERS.get(name)(getattr(cfg, name)) for name in TRACKERS if getattr(cfg, name, None)]


TRACKER_DIRS = ("tensorboard", "wandb")
"""Folders trackers write inside a run directory (listed in ``rundir.RUN_DIRS``: ``--overwrite`` removes them)."""
