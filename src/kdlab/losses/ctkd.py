"""Curriculum temperature for KD (CTKD, Li et al., AAAI 2023): the pure pieces.

Reference: the released ``CTKD`` code as vendored by logit-standardization-KD (``CTKD/models/temp_global.py``,
``CTKD/train_student.py``, ``CTKD/helper/loops.py``), used for the "CTKD" and "CTKD+Ours" rows of
logit-standardization-in-kd.md Tables 1–3. The temperature ``T = t_start + t_range·sigmoid(θ)`` is learned
adversarially: ``θ`` receives the distillation-loss gradient multiplied by ``λ ≤ 0`` (gradient reversal), so it
*maximises* the loss the student minimises, with ``λ`` growing in magnitude along a cosine curriculum.

The distillation loss itself is :func:`kdlab.losses.kd` with the learned (global or per-sample) temperature; ``T``
enters the T² factor too, as in the release (``KLDivLoss(batchmean)(...) * T * T``).
"""

from __future__ import annotations

import math
from typing import Any

import torch


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.lambda_ * grad, None


def gradient_reversal(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    """Identity forward; backward multiplies the incoming gradient by ``lambda_`` (Ganin & Lempitsky's GRL).

    As in the CTKD release (``dx = lambda_ * grads``): the curriculum passes ``λ ∈ [−1, 0]``, so a negative ``λ``
    reverses the gradient and ``λ = 0`` blocks it.
    """
    return _GradientReversal.apply(x, float(lambda_))


def ctkd_lambda(epoch: int, decay_epochs: int = 10, lambda_max: float = 0.0, lambda_min: float = -1.0) -> float:
    """The gradient-reversal factor of CTKD's cosine curriculum (release ``CosineDecay.get_value(epoch)``).

    ``λ(e) = λ_min + (λ_max − λ_min)·(1 + cos(π·min(e, n)/n))/2`` with ``n = decay_epochs``: ``λ_max`` (0) at epoch 0,
    ``λ_min`` (−1) from epoch ``n`` on. The release evaluates it at the 1-based epoch number, as kdlab's engine
    passes it. ``decay_epochs=0`` means ``λ_min`` throughout.
    """
    if decay_epochs <= 0:
        return lambda_min
    i = min(max(epoch, 0), decay_epochs)
    return lambda_min + (lambda_max - lambda_min) * 0.5 * (1.0 + math.cos(math.pi * i / decay_epochs))


def ctkd_temperature(theta: torch.Tensor, t_start: float = 1.0, t_range: float = 20.0) -> torch.Tensor:
    """``T = t_start + t_range · sigmoid(θ)`` ∈ (t_start, t_start + t_range) (release: ``opt.t_start + opt.t_end *
    torch.sigmoid(temp)`` with defaults 1 and 20, so T ∈ (1, 21))."""
    return t_start + t_range * torch.sigmoid(theta)
