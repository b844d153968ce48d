"""Weighted soft-label distillation (WSLD, Zhou et al., ICLR 2021) as a method."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method, MethodParams, teacher_bn_field
from kdlab.models.base import ModelOutput


class WSLDParams(MethodParams):
    temperature: float = Field(2.0, gt=0, description="softmax temperature T (release: 2)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the hard-label cross-entropy")
    kd_weight: float = Field(2.5, ge=0, description="weight α of the weighted soft term (release: 2.5)")
    teacher_bn: Literal["train", "eval"] = teacher_bn_field()


@METHODS.register("wsld")
class WSLD(Method):
    """``ce_weight·CE + kd_weight·wsld(s, t, y, T)`` (:func:`kdlab.losses.wsld`); defaults of the authors' release
    (``WSLDistiller``: T = 2, α = 2.5, CE 1).

    The teacher's logits come from its BatchNorms in training mode by default (each batch's statistics), as the
    release's ``train_with_distillation.py`` calls ``t_net.train()`` (ImageNet, the only release); unlike it, kdlab
    never updates the teacher's running statistics. ``teacher_bn: eval`` uses them instead (and allows a teacher
    cache)."""

    Params = WSLDParams

    def __init__(self, params: WSLDParams) -> None:
        super().__init__(params)
        self.teacher_bn = params.teacher_bn

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.kd_weight:
            out["wsld"] = p.kd_weight * L.wsld(student.logits, teacher.logits, target, p.temperature)
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
