"""Factor transfer (FT, Kim et al., NeurIPS 2018) as a method, as RepDistiller runs it (``-b 200``, 30 ``init``
epochs training the paraphraser first; :mod:`kdlab.methods.stage` for the shared stage conventions)."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.methods.base import METHODS
from kdlab.methods.stage import BN, CONV, CONV_T, PrePhaseMethod, PrePhaseParams, with_ce
from kdlab.models.cifar_resnet import CifarResNet
from kdlab.models.output import ModelOutput
from kdlab.models.wrn import WideResNet

#: students whose paraphraser phase RepDistiller trains at lr 0.01 (``resnet8…110``, ``resnet8x4/32x4``, ``wrn_*``);
#: every other student (VGG, ResNet50, MobileNetV2, ShuffleNets) at the run's base learning rate
RELEASE_LR_001 = (CifarResNet, WideResNet)


def _ft_stack(dims: int, channels: list[int], bn: bool, transpose: bool = False) -> nn.Sequential:
    """3×3 convs (stride 1, 'same' padding, with bias) each followed by [BN] and LeakyReLU(0.1), as RepDistiller's
    ``Paraphraser`` / ``Translator``."""
    layer = (CONV_T if transpose else CONV)[dims]
    mods: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        mods += [layer(cin, cout, 3, 1, 1)] + ([BN[dims](cout)] if bn else []) + [nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*mods)


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder of FT: the encoder's output is the teacher factor (k·C channels)."""

    def __init__(self, dims: int, channels: int, factor_channels: int) -> None:
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = _ft_stack(dims, [c, c, k, k], bn=False)
        self.decoder = _ft_stack(dims, [k, k, c, c], bn=False, transpose=True)


class FTParams(PrePhaseParams):
    feat_weight: float = Field(200.0, ge=0, description="weight β of the factor-transfer term (RepDistiller -b 200)")
    rate: float = Field(0.5, gt=0, le=1, description="paraphrase rate k: factor channels = k × teacher channels")
    init_epochs: int = Field(30, ge=0, description="pre-phase epochs training the paraphraser (RepDistiller 30)")
    init_lr: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto", description="pre-phase learning rate; auto: as RepDistiller, 0.01 for CIFAR ResNet / WRN students "
        "and optim.lr for the others (VGG, ResNet50, MobileNetV2, ShuffleNets); null: optim.lr",
    )  # fmt: skip


@METHODS.register("ft")
class FT(PrePhaseMethod):
    """Factor transfer: the paraphraser first learns to reconstruct the teacher's last stage (MSE, ``init_epochs``
    pre-phase epochs, RepDistiller's ``init`` optimizer and learning rate); then ``ce_weight·CE +
    feat_weight·ft(translator(f_s), encoder(f_t))`` with the paraphraser frozen (:func:`kdlab.losses.ft`). The student
    is not trained during the pre-phase."""

    Params = FTParams

    def __init__(self, params: FTParams) -> None:
        super().__init__(params)
        self._init_lr = params.init_lr if isinstance(params.init_lr, float) else None

    def pre_lr(self, lr: float) -> float:
        return self._init_lr or lr

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        if self.params.init_lr == "auto":
            self._init_lr = 0.01 if isinstance(student, RELEASE_LR_001) else None
        s, t = s_out.stages[-1], t_out.stages[-1]
        dims, k = t.dim() - 2, max(1, int(t.shape[1] * self.params.rate))
        self.paraphraser = Paraphraser(dims, t.shape[1], k).to(t.device)
        self.translator = _ft_stack(dims, [s.shape[1], s.shape[1], k, k], bn=True).to(s.device)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        f_t = teacher.stages[-1]
        if epoch <= 0:  # pre-phase: the paraphraser alone, on the teacher's feature
            return {"reconstruction": F.mse_loss(self.paraphraser.decoder(self.paraphraser.encoder(f_t)), f_t)}
        out = {}
        if p.feat_weight:
            with torch.no_grad():
                factor_t = self.paraphraser.encoder(f_t)
            out["feature"] = p.feat_weight * L.ft(self.translator(student.stages[-1]), factor_t)
        return with_ce(out, p.ce_weight, student.logits, target)
