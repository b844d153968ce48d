"""The optimizer of a run, built from ``cfg.optim`` over the student's and the method's parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdlab.config import OptimConfig


def build_optimizer(cfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum (Nesterov only when momentum > 0) and weight decay."""
    return torch.optim.SGD(
        list(params), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )  # fmt: skip
