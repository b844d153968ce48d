"""Stage methods without learnable parts: attention transfer (AT), similarity preserving (SP) and neuron selectivity
transfer (NST), with mdistiller's CIFAR-100 defaults (:mod:`kdlab.methods.stage` for the shared conventions)."""

from __future__ import annotations

import torch
from pydantic import Field

from kdlab import losses as L
from kdlab.methods.base import METHODS
from kdlab.methods.stage import StageMethod, StageParams, with_ce
from kdlab.models.output import ModelOutput


class _SummedStages(StageMethod):
    """``ce_weight·CE + feat_weight·Σ term(f_s, f_t)`` over :meth:`pairs` of stages (every stage, zipped from the first,
    as mdistiller's AT and NST; SP: the last only)."""

    def pairs(self, student: ModelOutput, teacher: ModelOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(student.stages, teacher.stages))

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:  # type: ignore[attr-defined]
            out["feature"] = p.feat_weight * sum(self.term(s, t) for s, t in self.pairs(student, teacher))  # type: ignore[attr-defined]
        return with_ce(out, p.ce_weight, student.logits, target)  # type: ignore[attr-defined]


class ATParams(StageParams):
    feat_weight: float = Field(1000.0, ge=0, description="weight β of the attention term (summed over stages)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map Σ_c |f_c|^p")


@METHODS.register("at")
class AT(_SummedStages):
    """Attention transfer: ``ce_weight·CE + feat_weight·Σ_stages at(f_s, f_t, p)`` (:func:`kdlab.losses.at`)."""

    Params = ATParams

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return L.at(s, t, self.params.p)  # type: ignore[attr-defined]


class SPParams(StageParams):
    feat_weight: float = Field(3000.0, ge=0, description="weight γ of the similarity-preserving term")


@METHODS.register("sp")
class SP(_SummedStages):
    """Similarity preserving: ``ce_weight·CE + feat_weight·sp(last student stage, last teacher stage)``
    (:func:`kdlab.losses.sp`; mdistiller ``feats[-1]``). Vector stages work too."""

    Params = SPParams
    maps = False

    def pairs(self, student: ModelOutput, teacher: ModelOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(student.stages[-1], teacher.stages[-1])]

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return L.sp(s, t)


class NSTParams(StageParams):
    feat_weight: float = Field(50.0, ge=0, description="weight λ of the MMD term (summed over stages)")


@METHODS.register("nst")
class NST(_SummedStages):
    """Neuron selectivity transfer: ``ce_weight·CE + feat_weight·Σ_stages nst(f_s, f_t)`` (:func:`kdlab.losses.nst`)."""

    Params = NSTParams

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return L.nst(s, t)
