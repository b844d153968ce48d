"""Training engine: the loop, schedules, checkpoints and run directories."""

from kdlab.engine.trainer import RunResult, Trainer, run

__all__ = ["RunResult", "Trainer", "run"]
