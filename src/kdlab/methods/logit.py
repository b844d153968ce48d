"""Logit-based methods: plain CE training, Hinton KD, its T → ∞ limit, logit matching and logit MSE.

Every distillation method here accepts the logit-standardization pre-process (``standardize: zscore | center |
scale``, logit-standardization-in-kd.md Algorithm 2 and Table 4), applied to student and teacher logits.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field, field_validator

from kdlab import losses as L
from kdlab.losses.standardize import Standardize
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput


class StandardizeParams(MethodParams):
    """Parameters shared by every method that takes the logit-standardization pre-process."""

    standardize: Literal["zscore", "center", "scale"] | None = Field(
        None,
        description="logit standardization of student and teacher logits before the loss: zscore (z−z̄)/σ, "
        "center z−z̄, scale z/σ, or null (logit-standardization-in-kd Table 4)",
    )
    std_ddof: Literal[0, 1] = Field(1, description="ddof of σ in standardize: 1 = authors' release, 0 = Algorithm 1")
    std_eps: float = Field(1e-7, ge=0, description="epsilon added to σ in standardize (release 1e-7; Algorithm 1: 0)")


def standardizer(p: StandardizeParams) -> Standardize:
    """The ``standardize=`` argument for :mod:`kdlab.losses` described by a method's parameters."""
    if p.standardize is None:
        return None
    return functools.partial(L.standardize, mode=p.standardize, ddof=p.std_ddof, eps=p.std_eps)


def _with_ce(
    out: dict[str, torch.Tensor], ce_weight: float, logits: torch.Tensor, target: torch.Tensor
) -> dict[str, torch.Tensor]:
    if ce_weight:
        out["ce"] = ce_weight * L.cross_entropy(logits, target)
    return out


class CEParams(MethodParams):
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the cross-entropy")


@METHODS.register("ce")
class CE(Method):
    """Training on labels alone (teachers and the no-distillation baseline)."""

    Params = CEParams
    needs_teacher = False

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        return {"ce": L.cross_entropy(student.logits, target, self.params.label_smoothing)}


class KDParams(StandardizeParams):
    temperature: float = Field(4.0, gt=0, description="softmax temperature T (base temperature with standardize)")
    ce_weight: float = Field(0.1, ge=0, description="weight (1 − α) of the cross-entropy term")
    kd_weight: float = Field(0.9, ge=0, description="weight α of the KD term (logit standardization recipe: 9)")
    scale: Literal["tau2", "max", "none"] | float = Field(
        "tau2",
        description="factor on the KL: tau2 = T² (release), max = max(T, T²) (kl-vs-mse Eq. 7), none, or a number",
    )

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, v: str | float) -> str | float:
        if not isinstance(v, str) and not v > 0:
            raise ValueError("a numeric scale must be positive")
        return v


@METHODS.register("kd")
class KD(Method):
    """Hinton et al. KD: ``ce_weight · CE + kd_weight · T² KL(p_t ‖ p_s)`` (kl-vs-mse Eq. 2).

    With ``standardize: zscore`` this is "KD+Ours" of logit-standardization-in-kd (recipe: T = 2, CE 0.1, KD 9).
    """

    Params = KDParams

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        kd = L.kd(student.logits, teacher.logits, p.temperature, p.scale, standardizer(p))
        return _with_ce({"kd": p.kd_weight * kd}, p.ce_weight, student.logits, target)


class KDInfParams(StandardizeParams):
    ce_weight: float = Field(0.0, ge=0, description="weight (1 − α) of the cross-entropy term")
    kd_weight: float = Field(1.0, ge=0, description="weight α of the T → ∞ KD term (kl-vs-mse: α = 1)")


@METHODS.register("kd_inf")
class KDInf(Method):
    """KD at infinite temperature: ``kd_weight · (1/2K)‖d − d̄‖²``, d = z^s − z^t (kl-vs-mse Eq. 5 / Eq. 8)."""

    Params = KDInfParams

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        loss = L.kd_inf(student.logits, teacher.logits, standardizer(p))
        return _with_ce({"kd_inf": p.kd_weight * loss}, p.ce_weight, student.logits, target)


class LMParams(StandardizeParams):
    ce_weight: float = Field(0.0, ge=0, description="weight of the cross-entropy term")
    lm_weight: float = Field(1.0, ge=0, description="weight of the logit-matching term")


@METHODS.register("lm")
class LM(Method):
    """Logit matching ``lm_weight · (1/2K)‖z^t − z^s‖²`` (kd-vs-logit-matching Eq. 2)."""

    Params = LMParams

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        loss = L.lm(student.logits, teacher.logits, standardizer(p))
        return _with_ce({"lm": p.lm_weight * loss}, p.ce_weight, student.logits, target)


class MSEParams(StandardizeParams):
    ce_weight: float = Field(0.0, ge=0, description="weight (1 − α) of the cross-entropy term")
    mse_weight: float = Field(1.0, ge=0, description="weight α of the logit MSE term")
    reduction: Literal["mean", "sum"] = Field(
        "mean", description="mean over batch and classes (released code) or sum over classes (Eq. 9 as printed)"
    )


@METHODS.register("mse")
class MSE(Method):
    """Direct logit matching: ``ce_weight · CE + mse_weight · MSE(z_s, z_t)`` (L′ of kl-vs-mse Eq. 9, α = 1 default)."""

    Params = MSEParams

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int
    ) -> dict[str, torch.Tensor]:
        p = self.params
        assert teacher is not None
        loss = L.mse(student.logits, teacher.logits, p.reduction, standardizer(p))
        return _with_ce({"mse": p.mse_weight * loss}, p.ce_weight, student.logits, target)
