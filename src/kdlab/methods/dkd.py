"""Decoupled knowledge distillation (DKD) as a method: CE + warm-up · (α·TCKD + β·NCKD)."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS, Method
from kdlab.methods.logit import StandardizeParams, standardizer
from kdlab.models.base import ModelOutput


class DKDParams(StandardizeParams):
    alpha: float = Field(1.0, ge=0, description="weight α of TCKD (logit standardization recipe: α × KD weight 9)")
    beta: float = Field(8.0, ge=0, description="weight β of NCKD (logit standardization recipe: β × KD weight 9)")
    temperature: float = Field(4.0, gt=0, description="softmax temperature T (base temperature with standardize)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    warmup_epochs: int = Field(20, ge=0, description="DKD term scaled by min(epoch / warmup_epochs, 1); 0 = none")
    gt_offset: float | None = Field(
        1000.0, gt=0, description="NCKD: subtract this from the target logit/T (release: 1000); null = exact removal"
    )


@METHODS.register("dkd")
class DKD(Method):
    """Decoupled KD (Zhao et al., CVPR 2022) as released in mdistiller: ``ce_weight · CE + min(epoch/20, 1) ·
    (α·TCKD + β·NCKD)``, epochs counted from 1 as in the release.

    Released CIFAR-100 settings: α = 1, β = 8, T = 4, CE 1.0, warm-up 20 epochs. "DKD+Ours" of
    logit-standardization-in-kd: ``standardize: zscore``, T = 2, α and β multiplied by the KD weight 9 (α = 9,
    β = 72), CE 1.0 (final version of the authors' ``tools/train.py``; an earlier version set β = α·9·9 and left
    T = 4 by overriding the wrong config key).
    """

    Params = DKDParams

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        warm = min(epoch / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
        loss = L.dkd(
            student.logits, teacher.logits, target, p.alpha, p.beta, p.temperature, standardizer(p), p.gt_offset
        )
        out = {"dkd": warm * loss}
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
