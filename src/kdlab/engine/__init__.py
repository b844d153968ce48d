"""Training engine: the loop, schedules, checkpoints and run directories.

``Trainer``, ``RunResult`` and ``run`` are imported on first use, so that reading a run folder
(:mod:`kdlab.engine.rundir`) or a command's start-up does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdlab.engine.trainer import RunResult, Trainer, run

__all__ = ["RunResult", "Trainer", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdlab.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'kdlab.engine' has no attribute '{name}'")
