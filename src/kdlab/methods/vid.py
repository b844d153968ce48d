"""Variational information distillation (VID, Ahn et al., CVPR 2019) as a method."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from kdlab import losses as L
from kdlab.errors import ConfigError
from kdlab.methods.base import METHODS, MethodParams
from kdlab.methods.feature import _FeatureMethod
from kdlab.models.base import ModelOutput
from kdlab.models.connectors import common_spatial, reduce_to

_LAYER = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class VIDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    feat_weight: float = Field(1.0, ge=0, description="weight of the VID term (RepDistiller -b 1)")
    init_pred_var: float = Field(5.0, gt=0, description="initial variance σ² of every channel (release 5)")
    eps: float = Field(1e-5, gt=0, description="variance floor added to softplus(α) (release 1e-5)")
    train_variance: bool = Field(
        True, description="train the per-channel variances with the regressors (RepDistiller, whose numbers the "
        "papers' VID rows report); false: keep them at init_pred_var (mdistiller never passes them to its optimizer)",
    )  # fmt: skip
    layers: Literal["stages", "last"] = Field(
        "stages", description="stages: one VID term per intermediate stage pair, summed (the release, feats[1:-1]); "
        "last: only the last pre-pool maps",
    )  # fmt: skip


def _regressor(dims: int, cin: int, cout: int) -> nn.Sequential:
    """RepDistiller's VID mean regressor: 1×1 conv (bias-free) → ReLU → 1×1 conv → ReLU → 1×1 conv, mid width = the
    teacher's channels (Linear layers for vector features)."""
    layer = _LAYER[dims]

    def conv(a: int, b: int) -> nn.Module:
        return layer(a, b, bias=False) if dims == 0 else layer(a, b, 1, bias=False)

    return nn.Sequential(conv(cin, cout), nn.ReLU(), conv(cout, cout), nn.ReLU(), conv(cout, cout))


@METHODS.register("vid")
class VID(_FeatureMethod):
    """``ce_weight·CE + feat_weight·Σ_pairs vid(μ(f_s), f_t, σ²)`` (:func:`kdlab.losses.vid`).

    As released, one term per intermediate stage pair (RepDistiller ``feat[1:-1]``, i.e. kdlab's ``stages`` paired
    from the first, the longer list truncated), summed; ``layers: last`` uses only the last pre-pool maps. Each pair
    has its own regressor μ (the released 3-layer 1×1-conv net) and per-teacher-channel variance σ² = softplus(α) +
    eps, α initialised so that σ² = ``init_pred_var``; the larger map is average-pooled to the smaller first. Both
    train with the student and are dropped at test time. ``train_variance`` follows RepDistiller (the default: α is a
    parameter of the loss module its optimizer trains); with ``false`` α stays at its initial value, as in mdistiller,
    whose ``log_scales`` are a plain list its ``get_learnable_parameters`` leaves out.
    """

    Params = VIDParams
    teacher_outputs = ("stages",)

    def __init__(self, params: VIDParams) -> None:  # type: ignore[override]
        super().__init__(params)
        if params.layers == "last":
            self.teacher_outputs = ("prepool",)

    def _pairs(self, s_out: ModelOutput, t_out: ModelOutput) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.params.layers == "last":
            return [(s_out.prepool, t_out.prepool)]
        return list(zip(s_out.stages, t_out.stages))

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        pairs = self._pairs(s_out, t_out)
        if not pairs:
            raise ConfigError("vid with layers=stages needs stage features from both models (model.features: [...] "
                              "for user models), or set method.layers=last")
        p = self.params
        alpha = math.log(math.expm1(p.init_pred_var - p.eps))  # softplus⁻¹(σ² − eps), as released
        self._sizes = [common_spatial(fs, ft) for fs, ft in pairs]
        self.regressors = nn.ModuleList(
            _regressor(0 if size is None else len(size), fs.shape[1], ft.shape[1]).to(example.device)
            for size, (fs, ft) in zip(self._sizes, pairs)
        )
        self.log_scales = nn.ParameterList(
            nn.Parameter(torch.full((ft.shape[1],), alpha, device=example.device), requires_grad=p.train_variance)
            for _, ft in pairs
        )

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            terms = [
                L.vid(reg(reduce_to(fs, size)), reduce_to(ft, size), L.vid_variance(log_scale, p.eps))
                for (fs, ft), size, reg, log_scale in zip(
                    self._pairs(student, teacher), self._sizes, self.regressors, self.log_scales)
            ]  # fmt: skip
            out["vid"] = p.feat_weight * sum(terms)
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
