"""The teacher an instrument compares the student with during training.

In a distillation run it is the run's own frozen teacher. A run whose method uses no teacher (plain CE, the baseline
of reusing-teacher-classifier's "normal training") may still name one in its config (``teacher.name`` and
``teacher.checkpoint``): the instruments then load it as a reference, without it taking any part in training.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from kdlab.engine.trainer import Trainer

_CACHE: weakref.WeakKeyDictionary[Trainer, nn.Module | None] = weakref.WeakKeyDictionary()


def reference_teacher(trainer: Trainer) -> nn.Module | None:
    """The run's teacher, else the teacher named in its config (loaded once, frozen, on the run's device), else None."""
    if trainer.teacher is not None:
        return trainer.teacher
    if trainer not in _CACHE:
        teacher = None
        if trainer.cfg.teacher is not None:
            from kdlab.engine.teachers import load_teacher

            teacher = load_teacher(trainer.cfg, trainer.data.num_classes).to(trainer.device)
        _CACHE[trainer] = teacher
    return _CACHE[trainer]
