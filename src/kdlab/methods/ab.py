"""Activation boundaries (AB, Heo et al., AAAI 2019) as a method, as RepDistiller runs it (``-b 1``, 30 ``init``
epochs of boundary transfer, then CE alone; :mod:`kdlab.methods.stage` for the shared stage conventions)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from kdlab import losses as L
from kdlab.methods.base import METHODS
from kdlab.methods.stage import PrePhaseMethod, PrePhaseParams, as_maps, last_aligned, with_ce
from kdlab.models.connectors import conv_regressor, reduce_to
from kdlab.models.output import ModelOutput


class ABConnector(nn.Module):
    """AB's student → teacher map on pre-activations, RepDistiller's ``Connector``: nothing when channels and size
    already agree, else the releases' regressor without its ReLU (:func:`kdlab.models.connectors.conv_regressor`)."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__()
        same = s.shape[1:] == t.shape[1:]
        self.layers: nn.Module = nn.Identity() if same else conv_regressor(s, t, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ABParams(PrePhaseParams):
    feat_weight: float = Field(1.0, ge=0, description="weight of the AB loss (RepDistiller -b 1; scaled by 3/1000)")
    margin: float = Field(1.0, gt=0, description="margin μ of the activation boundary")
    init_epochs: int = Field(30, ge=1, description="pre-phase epochs of activation-boundary transfer (release 30)")
    init_lr: float | None = Field(None, gt=0, description="pre-phase learning rate; null: optim.lr (as released)")


@METHODS.register("ab")
class AB(PrePhaseMethod):
    """Activation boundaries: for ``init_epochs`` pre-phase epochs the student's backbone and per-stage connectors
    learn the teacher's activation boundaries, ``feat_weight · 3/1000 · Σ_i 2^(i−n+1)·ab(conn_i(p_s), p_t)`` on the
    pre-activations (:func:`kdlab.losses.ab`), with RepDistiller's ``init`` optimizer; then the student trains on
    ``ce_weight·CE`` alone (RepDistiller), and the teacher is no longer run (``teacher_outputs`` becomes empty at the
    first main-phase step)."""

    Params = ABParams
    teacher_outputs = ("preacts",)
    pre_trains_student = True  # RepDistiller's init trains the connectors and the student's feature modules
    field = "preacts"
    vectors = True

    def pre_lr(self, lr: float) -> float:
        return self.params.init_lr or lr

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        s, t = last_aligned(as_maps(s_out.preacts), as_maps(t_out.preacts))
        self.connectors = nn.ModuleList(ABConnector(a, b) for a, b in zip(s, t))
        self.connectors.to(s[0].device)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        if epoch > 0:
            self.teacher_outputs = ()  # the main phase reads no teacher: the engine stops running it from here on
            return with_ce({}, p.ce_weight, student.logits, target)
        assert teacher is not None
        s_list, t_list = last_aligned(as_maps(student.preacts), as_maps(teacher.preacts))
        n = len(s_list)
        total = student.logits.new_zeros(())
        for i, (s, t, conn) in enumerate(zip(s_list, t_list, self.connectors)):
            s = conn(s)
            total = total + 2.0 ** (i - n + 1) * L.ab(s, reduce_to(t, tuple(s.shape[2:])), p.margin)
        return {"ab": p.feat_weight * total * 3 / 1000}
