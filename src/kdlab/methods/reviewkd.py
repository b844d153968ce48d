"""Knowledge review (ReviewKD, Chen et al., CVPR 2021) as a method, with mdistiller's CIFAR-100 defaults
(:mod:`kdlab.methods.stage` for the shared stage conventions)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.methods.base import METHODS
from kdlab.methods.stage import BN, CONV, StageMethod, StageParams, as_maps, check_stages, last_aligned, with_ce
from kdlab.models.output import ModelOutput


class ABF(nn.Module):
    """ReviewKD's attention-based fusion: 1×1 conv-BN to ``mid`` channels, fused with the upsampled residual of the
    deeper level by a 2-channel sigmoid attention, resized to the teacher's size, then 3×3 conv-BN to the teacher's
    channels. ``forward`` returns ``(output, residual for the next level)``."""

    def __init__(self, dims: int, cin: int, mid: int, cout: int, fuse: bool) -> None:
        super().__init__()
        conv, bn = CONV[dims], BN[dims]
        self.conv1 = nn.Sequential(conv(cin, mid, 1, bias=False), bn(mid))
        self.conv2 = nn.Sequential(conv(mid, cout, 3, 1, 1, bias=False), bn(cout))
        self.att_conv = nn.Sequential(conv(mid * 2, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:2]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKDParams(StageParams):
    feat_weight: float = Field(5.0, ge=0, description="weight of the HCL term (mdistiller CIFAR-100 recipe: 5)")
    warmup_epochs: int = Field(20, ge=0, description="the HCL weight ramps up linearly over these epochs")
    max_mid_channel: int = Field(512, ge=1, description="upper bound of the ABF width")
    stu_preact: bool = Field(False, description="fuse the student's pre-activations instead of its stage outputs")


def _as_map(pooled: torch.Tensor, dims: int) -> torch.Tensor:
    return pooled.reshape(*pooled.shape, *([1] * dims))


@METHODS.register("reviewkd")
class ReviewKD(StageMethod):
    """Knowledge review: the student's stages and pooled vector, deepest first, are fused level by level by ABF
    modules and matched to the teacher's pre-activations and pooled vector with
    ``feat_weight · min(epoch / warmup_epochs, 1) · hcl`` (:func:`kdlab.losses.hcl`), next to ``ce_weight·CE``."""

    Params = ReviewKDParams
    teacher_outputs = ("preacts", "pooled")
    vectors = True

    def _student_levels(self, out: ModelOutput) -> list[torch.Tensor]:
        return list(as_maps(out.preacts if self.params.stu_preact else out.stages))

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        check_stages("ReviewKD", "teacher", teacher, t_out, "preacts", False)
        s, t = last_aligned(tuple(self._student_levels(s_out)), as_maps(t_out.preacts))
        dims = s[0].dim() - 2
        s = s + [_as_map(s_out.pooled, dims)]
        t = t + [_as_map(t_out.pooled, dims)]
        cin, cout = [f.shape[1] for f in s], [f.shape[1] for f in t]
        mid = min(self.params.max_mid_channel, cin[-1])
        abfs = [ABF(dims, ci, mid, co, i < len(cin) - 1) for i, (ci, co) in enumerate(zip(cin, cout))]
        self.abfs = nn.ModuleList(abfs[::-1]).to(s[0].device)  # deepest (pooled) level first
        self._out_sizes = [tuple(f.shape[2:]) for f in t[::-1]]
        self._n = len(s) - 1

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            levels = self._student_levels(student)[-self._n :]
            dims = levels[0].dim() - 2
            x = [_as_map(student.pooled, dims)] + levels[::-1]
            fused, residual = self.abfs[0](x[0], None, self._out_sizes[0])
            results = [fused]
            for feat, abf, size in zip(x[1:], self.abfs[1:], self._out_sizes[1:]):
                fused, residual = abf(feat, residual, size)
                results.insert(0, fused)
            targets = list(as_maps(teacher.preacts)[-self._n :]) + [_as_map(teacher.pooled, dims)]
            ramp = min(epoch / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
            out["feature"] = p.feat_weight * ramp * L.hcl(results, targets)
        return with_ce(out, p.ce_weight, student.logits, target)
