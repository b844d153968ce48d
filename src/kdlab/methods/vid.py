"""Variational information distillation (VID, Ahn et al., CVPR 2019) as a method."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from kdlab import losses as L
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


def _regressor(dims: int, cin: int, cout: int) -> nn.Sequential:
    """RepDistiller's VID mean regressor: 1×1 conv (bias-free) → ReLU → 1×1 conv → ReLU → 1×1 conv, mid width = the
    teacher's channels (Linear layers for vector features)."""
    layer = _LAYER[dims]

    def conv(a: int, b: int) -> nn.Module:
        return layer(a, b, bias=False) if dims == 0 else layer(a, b, 1, bias=False)

    return nn.Sequential(conv(cin, cout), nn.ReLU(), conv(cout, cout), nn.ReLU(), conv(cout, cout))


@METHODS.register("vid")
class VID(_FeatureMethod):
    """``ce_weight·CE + feat_weight·vid(μ(f_s), f_t, σ²)`` on the pre-pool maps (:func:`kdlab.losses.vid`).

    μ is the released 3-layer 1×1-conv regressor, σ² = softplus(α) + eps per teacher channel with α initialised so
    that σ² = ``init_pred_var``; the larger map is average-pooled to the smaller first. Both train with the student
    and are dropped at test time. The release applies VID to each intermediate stage; kdlab applies it to the last
    pre-pool map, the feature every kdlab model exposes.
    """

    Params = VIDParams
    teacher_outputs = ("prepool",)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        size = common_spatial(s_out.prepool, t_out.prepool)
        self._size = size
        dims = 0 if size is None else len(size)
        self.regressor = _regressor(dims, s_out.prepool.shape[1], t_out.prepool.shape[1]).to(example.device)
        p = self.params
        alpha = math.log(math.expm1(p.init_pred_var - p.eps))  # softplus⁻¹(σ² − eps), as released
        self.log_scale = nn.Parameter(torch.full((t_out.prepool.shape[1],), alpha, device=example.device))

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            mean = self.regressor(reduce_to(student.prepool, self._size))
            t = reduce_to(teacher.prepool, self._size)
            out["vid"] = p.feat_weight * L.vid(mean, t, L.vid_variance(self.log_scale, p.eps))
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
