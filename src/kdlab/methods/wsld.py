"""Weighted soft-label distillation (WSLD, Zhou et al., ICLR 2021) as a method."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput


class WSLDParams(MethodParams):
    temperature: float = Field(2.0, gt=0, description="softmax temperature T (release: 2)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the hard-label cross-entropy")
    kd_weight: float = Field(2.5, ge=0, description="weight α of the weighted soft term (release: 2.5)")


@METHODS.register("wsld")
class WSLD(Method):
    """``ce_weight·CE + kd_weight·wsld(s, t, y, T)`` (:func:`kdlab.losses.wsld`); defaults of the authors' release
    (``WSLDistiller``: T = 2, α = 2.5, CE 1)."""

    Params = WSLDParams

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.kd_weight:
            out["wsld"] = p.kd_weight * L.wsld(student.logits, teacher.logits, target, p.temperature)
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
