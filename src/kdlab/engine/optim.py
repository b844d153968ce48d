"""The optimizer of a run, built from ``cfg.optim`` over the student's and the method's parameters.

SGD (momentum, optional Nesterov), Adam or AdamW. ``no_decay_norm`` / ``no_decay_bias`` move the parameters of
normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm) and/or every bias into a second parameter group
without weight decay (the kl-vs-mse-in-kd release exempts BatchNorm). Without exemptions there is one group holding
the parameters in ``module.parameters()`` order, so optimizer checkpoints keep their layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from kdlab.config import OptimConfig
from kdlab.errors import ConfigError
from kdlab.registry import Registry

NORM_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)

OPTIMIZERS: Registry[Callable[[list[dict[str, Any]], OptimConfig], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZERS.add("sgd", lambda groups, c: torch.optim.SGD(
    groups, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0, weight_decay=c.weight_decay))
OPTIMIZERS.add("adam", lambda groups, c: torch.optim.Adam(
    groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay))
OPTIMIZERS.add("adamw", lambda groups, c: torch.optim.AdamW(
    groups, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay))  # fmt: skip


def param_groups(cfg: OptimConfig, modules: list[nn.Module]) -> list[dict[str, Any]]:
    """``[{params: decayed}, {params: exempt, weight_decay: 0}]`` (the second only when something is exempt)."""
    decay: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                free = (cfg.no_decay_norm and isinstance(sub, NORM_LAYERS)) or (cfg.no_decay_bias and name == "bias")
                (exempt if free else decay).append(p)
    return [{"params": decay}] + ([{"params": exempt, "weight_decay": 0.0}] if exempt else [])


def build_optimizer(cfg: OptimConfig, *modules: nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` over the parameters of ``modules`` (student first, then the method).

    A method whose pre-phase trains with SGD settings of its own (``pre_optim``: FT, AB) needs ``optim.name=sgd``."""
    for m in modules:
        if getattr(m, "pre_optim", None) and cfg.name != "sgd":
            raise ConfigError(f"optim.name={cfg.name}, but the method's pre-phase trains with SGD as released "
                              "(method.init_optim=release): set method.init_optim=run or optim.name=sgd")  # fmt: skip
    return OPTIMIZERS.get(cfg.name)(param_groups(cfg, list(modules)), cfg)


def set_epoch_hyperparameters(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, lr: float, pre: Mapping[str, Any] | None = None
) -> None:
    """Set every group's learning rate for the coming epoch and, for SGD, its momentum, Nesterov and weight decay: the
    pre-phase's own settings ``pre`` (:attr:`kdlab.methods.Method.pre_optim`, applied to every group, exempt ones
    included, as RepDistiller's ``init`` optimizer decays every parameter), else ``cfg``'s (group 1, when
    :func:`param_groups` made one, is the exempt group). Set at every epoch, so a resume from either phase is exact."""
    sgd = isinstance(optimizer, torch.optim.SGD)
    for i, group in enumerate(optimizer.param_groups):
        group["lr"] = lr
        if not sgd:
            continue
        if pre is not None:
            group.update(momentum=pre["momentum"], nesterov=pre["nesterov"], weight_decay=pre["weight_decay"],
                         dampening=0.0)  # fmt: skip
        else:
            group.update(momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0, dampening=0.0,
                         weight_decay=cfg.weight_decay if i == 0 else 0.0)  # fmt: skip
