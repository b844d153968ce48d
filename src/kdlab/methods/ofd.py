"""A comprehensive overhaul of feature distillation (OFD, Heo et al., ICCV 2019) as a method, with mdistiller's
CIFAR-100 defaults and the releases' teacher in BatchNorm training mode (:mod:`kdlab.methods.stage` for the shared
stage conventions)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.errors import ConfigError
from kdlab.methods.base import METHODS, teacher_bn_field
from kdlab.methods.stage import BN, CONV, StageMethod, StageParams, as_maps, last_aligned, with_ce
from kdlab.models.connectors import common_spatial, reduce_to
from kdlab.models.output import ModelOutput

class OFDConnector(nn.Module):
    """OFD's student pre-activation → teacher's: pool the larger map to the common size (mdistiller assumes equal
    sizes), then a conv (kernel ``k``, OFD's initialisation) and BatchNorm."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, k: int = 1) -> None:
        super().__init__()
        self._size = common_spatial(s, t)
        dims = s.dim() - 2
        conv = CONV[dims](s.shape[1], t.shape[1], k, 1, (k - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k**dims * t.shape[1])))  # N(0, 2/(k^d·out)); BN 1 / 0
        self.layers = nn.Sequential(conv, BN[dims](t.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(reduce_to(x, self._size))


class OFDParams(StageParams):
    feat_weight: float = Field(0.001, ge=0, description="weight of the OFD distance (mdistiller 0.001)")
    kernel_size: int = Field(1, ge=1, description="connector kernel size (odd)")
    teacher_bn: Literal["train", "eval"] = teacher_bn_field()


@METHODS.register("ofd")
class OFD(StageMethod):
    """A comprehensive overhaul of feature distillation: ``ce_weight·CE + feat_weight·Σ_i ofd(conn_i(p_s),
    pool(p_t), m_i) / 2^(n−i−1)`` on the pre-activations, margins ``m_i`` from the teacher's BatchNorm before each
    stage ReLU (:func:`kdlab.losses.ofd_margin`; ``stage_norms`` of the teacher model).

    By default the teacher's pre-activations come from its BatchNorms in training mode (each batch's statistics), as
    mdistiller's ``OFD.train`` and the authors' ``train_with_distillation.py`` put the whole teacher in training mode;
    unlike them, kdlab never updates the teacher's running statistics (the losses do not read them).
    ``teacher_bn: eval`` uses the running statistics instead."""

    Params = OFDParams
    teacher_outputs = ("preacts",)
    field = "preacts"
    vectors = True

    def __init__(self, params: OFDParams) -> None:
        super().__init__(params)
        self.teacher_bn = params.teacher_bn

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        if self.params.kernel_size % 2 == 0:
            raise ConfigError(f"ofd: method.kernel_size must be odd, got {self.params.kernel_size}")
        norms = teacher.stage_norms()  # type: ignore[operator]
        if len(norms) != len(t_out.preacts):
            raise ConfigError(f"ofd: the teacher has {len(norms)} stage BatchNorms for {len(t_out.preacts)} stages")
        s, t = last_aligned(as_maps(s_out.preacts), as_maps(t_out.preacts))
        norms = norms[len(norms) - len(t) :]
        self.connectors = nn.ModuleList(
            OFDConnector(a, b, self.params.kernel_size) for a, b in zip(s, t)
        ).to(s[0].device)  # fmt: skip
        for i, (bn, feat) in enumerate(zip(norms, t)):
            margin = L.ofd_margin(bn.weight.detach(), bn.bias.detach())
            self.register_buffer(f"margin{i}", margin.reshape(1, -1, *([1] * (feat.dim() - 2))).to(feat.device))
        self._n = len(t)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            s_list, t_list = last_aligned(as_maps(student.preacts), as_maps(teacher.preacts))
            total = student.logits.new_zeros(())
            for i, (s, t, conn) in enumerate(zip(s_list, t_list, self.connectors)):
                s = conn(s)
                t = F.adaptive_avg_pool1d(t, s.shape[2]) if t.dim() == 3 else F.adaptive_avg_pool2d(t, s.shape[2:])
                total = total + L.ofd(s, t, getattr(self, f"margin{i}")) / 2 ** (self._n - i - 1)
            out["feature"] = p.feat_weight * total
        return with_ce(out, p.ce_weight, student.logits, target)
