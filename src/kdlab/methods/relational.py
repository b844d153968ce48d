"""Relational embedding methods: RKD and PKT, on the pooled (penultimate) features of student and teacher.

Both follow mdistiller / RepDistiller: the loss is computed on ``pooled_feat`` / ``feat[-1]`` (the vector the
classifier reads), next to the student's cross-entropy with weight 1. No learnable parts: the relations are
compared, not the features, so student and teacher widths may differ.
"""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput


def _with_ce(out: dict[str, torch.Tensor], ce_weight: float, logits: torch.Tensor, target: torch.Tensor):
    if ce_weight:
        out["ce"] = ce_weight * L.cross_entropy(logits, target)
    return out


class RKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    feat_weight: float = Field(1.0, ge=0, description="weight of the RKD term (mdistiller RKD.LOSS.FEAT_WEIGHT)")
    distance_weight: float = Field(25.0, ge=0, description="weight of the distance-wise term inside RKD")
    angle_weight: float = Field(50.0, ge=0, description="weight of the angle-wise term inside RKD")


@METHODS.register("rkd")
class RKD(Method):
    """Relational KD (Park et al., CVPR 2019): ``ce_weight·CE + feat_weight·rkd(pooled_s, pooled_t)`` with the
    released distance/angle weights 25/50 (:func:`kdlab.losses.rkd`)."""

    Params = RKDParams
    teacher_outputs = ("pooled",)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            out["rkd"] = p.feat_weight * L.rkd(student.pooled, teacher.pooled, p.distance_weight, p.angle_weight)
        return _with_ce(out, p.ce_weight, student.logits, target)


class PKTParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    feat_weight: float = Field(30000.0, ge=0, description="weight of the PKT term (RepDistiller -b 30000)")


@METHODS.register("pkt")
class PKT(Method):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): ``ce_weight·CE + feat_weight·pkt(pooled_s,
    pooled_t)``, the released multiplier 30000 (:func:`kdlab.losses.pkt`)."""

    Params = PKTParams
    teacher_outputs = ("pooled",)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {"pkt": p.feat_weight * L.pkt(student.pooled, teacher.pooled)} if p.feat_weight else {}
        return _with_ce(out, p.ce_weight, student.logits, target)
