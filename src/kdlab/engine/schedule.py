"""Per-epoch learning-rate schedules (pure functions of the 1-based epoch)."""

from __future__ import annotations

import math

from kdlab.config import ScheduleConfig


def lr_at(epoch: int, base_lr: float, total_epochs: int, cfg: ScheduleConfig) -> float:
    """Learning rate used during ``epoch`` (1-based).

    ``multistep``: ``base · gamma^(number of milestones < epoch)`` — the RepDistiller/mdistiller convention, so with
    milestones 150/180/210 epochs 1–150 use the base rate and epoch 151 the first decayed one.
    ``cosine``: half-cosine from ``base`` to ``min_lr`` over the post-warm-up epochs. ``constant``: ``base``.
    A linear warm-up over ``warmup_epochs`` precedes any of them.
    """
    if cfg.warmup_epochs and epoch <= cfg.warmup_epochs:
        return base_lr * epoch / cfg.warmup_epochs
    if cfg.name == "multistep":
        return base_lr * cfg.gamma ** sum(epoch > m for m in cfg.milestones)
    if cfg.name == "cosine":
        span = max(1, total_epochs - cfg.warmup_epochs)
        progress = (epoch - 1 - cfg.warmup_epochs) / span
        return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr
