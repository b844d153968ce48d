"""Curriculum temperature KD (CTKD, Li et al., AAAI 2023): KD with an adversarially learned temperature.

The temperature module is a sub-module of the method, so the engine optimises it with the student (same SGD,
learning rate and weight decay, as in the release, where ``trainable_list = [model_s, mlp]``) and checkpoints it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method
from kdlab.methods.logit import StandardizeParams, standardizer
from kdlab.models.base import ModelOutput


class GlobalTemperature(nn.Module):
    """One learnable ``θ`` for all samples (release ``Global_T``: ``nn.Parameter(torch.ones(1))`` behind a GRL)."""

    def __init__(self, theta_init: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.full((1,), float(theta_init)))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, lambda_: float) -> torch.Tensor:
        return L.gradient_reversal(self.theta, lambda_)


class InstanceTemperature(nn.Module):
    """One ``θ`` per sample from a 2-layer MLP on the concatenated ``[teacher, student]`` logits (the CTKD paper's
    instance-wise variant; the official release ships only the global one, so the hidden width is kdlab's choice).

    The logits enter detached: the module is the student's adversary and must not pass reversed gradients back into
    the student through its inputs. The gradient reversal sits on the MLP output, reversing the gradient of every
    MLP weight.
    """

    def __init__(self, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, lambda_: float) -> torch.Tensor:
        x = torch.cat([teacher, student], dim=1).detach()
        return L.gradient_reversal(self.mlp(x).squeeze(1), lambda_)


class CTKDParams(StandardizeParams):
    mode: Literal["global", "instance"] = Field("global", description="one learned temperature, or one per sample")
    t_start: float = Field(1.0, gt=0, description="lowest temperature: T = t_start + t_range·sigmoid(θ)")
    t_range: float = Field(20.0, ge=0, description="temperature range: T = t_start + t_range·sigmoid(θ)")
    theta_init: float = Field(1.0, description="initial θ of the global temperature (release: 1)")
    hidden: int = Field(256, gt=0, description="hidden width of the instance-wise temperature MLP")
    decay_epochs: int = Field(10, ge=0, description="epochs of the cosine curriculum of the gradient-reversal λ")
    lambda_max: float = Field(0.0, description="λ at the start of the curriculum (release: 0)")
    lambda_min: float = Field(-1.0, description="λ at the end of the curriculum (release: −1, full reversal)")
    ce_weight: float = Field(0.1, ge=0, description="weight of the cross-entropy term")
    kd_weight: float = Field(0.9, ge=0, description="weight of the KD term (logit standardization recipe: 9)")


@METHODS.register("ctkd")
class CTKD(Method):
    """KD whose temperature ``T = t_start + t_range·sigmoid(θ)`` is trained through a gradient-reversal layer.

    ``ce_weight · CE + kd_weight · T² KL(p_t(T) ‖ p_s(T))``; ``θ`` gets ``λ(epoch) · ∂loss/∂θ`` with ``λ`` following
    :func:`kdlab.losses.ctkd_lambda` (0 → −1 over ``decay_epochs``), i.e. it ascends the KD loss. Release recipe:
    CE 0.1, KD 0.9 (``-r 0.1 -a 0.9``); with logit standardization ("CTKD+Ours") KD weight 9 and the learned
    temperature as the base temperature.
    """

    Params = CTKDParams

    def __init__(self, params: CTKDParams) -> None:
        super().__init__(params)
        self.temperature_module: nn.Module | None = (
            GlobalTemperature(params.theta_init) if params.mode == "global" else None
        )

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        if self.params.mode == "instance":
            was_training = student.training
            student.eval()
            with torch.no_grad():
                num_classes = student.forward_features(example).logits.shape[1]  # type: ignore[operator]
            student.train(was_training)
            self.temperature_module = InstanceTemperature(num_classes, self.params.hidden)

    def temperature(self, student: torch.Tensor, teacher: torch.Tensor, epoch: int) -> torch.Tensor:
        """The temperature for this batch (shape ``(1,)`` global or ``(B,)`` per sample), GRL attached."""
        p = self.params
        if self.temperature_module is None:
            raise RuntimeError("CTKD(mode='instance') needs setup() before use")
        lam = L.ctkd_lambda(epoch, p.decay_epochs, p.lambda_max, p.lambda_min)
        theta = self.temperature_module(student, teacher, lam)
        return L.ctkd_temperature(theta, p.t_start, p.t_range)

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        t = self.temperature(student.logits, teacher.logits, epoch)
        out = {"kd": p.kd_weight * L.kd(student.logits, teacher.logits, t, standardize=standardizer(p))}
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
