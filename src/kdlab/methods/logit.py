"""Logit-based methods: plain cross-entropy training, Hinton KD, logit MSE."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput


class CEParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@METHODS.register("ce")
class CE(Method):
    """Training on labels alone (teachers and the no-distillation baseline)."""

    Params = CEParams
    needs_teacher = False

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        return {"ce": L.cross_entropy(student.logits, target, self.params.label_smoothing)}


class KDParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T")
    ce_weight: float = Field(0.1, ge=0, description="weight (1 − α) of the cross-entropy term")
    kd_weight: float = Field(0.9, ge=0, description="weight α of the KD term")


@METHODS.register("kd")
class KD(Method):
    """Hinton et al. KD: ``ce_weight · CE + kd_weight · T² KL(p_t ‖ p_s)`` (kl-vs-mse Eq. 2)."""

    Params = KDParams

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {"kd": p.kd_weight * L.kd(student.logits, teacher.logits, p.temperature)}
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out


class MSEParams(MethodParams):
    ce_weight: float = Field(0.0, ge=0, description="weight (1 − α) of the cross-entropy term")
    mse_weight: float = Field(1.0, ge=0, description="weight α of the logit MSE term")


@METHODS.register("mse")
class MSE(Method):
    """Direct logit matching: ``ce_weight · CE + mse_weight · MSE(z_s, z_t)`` (kl-vs-mse Eq. 10, α = 1 default)."""

    Params = MSEParams

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {"mse": p.mse_weight * L.mse(student.logits, teacher.logits)}
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
