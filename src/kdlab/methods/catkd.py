"""Class attention transfer (CAT-KD, Guo et al., CVPR 2023) as a method."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from kdlab import losses as L
from kdlab.errors import ConfigError
from kdlab.methods.base import METHODS, MethodParams
from kdlab.methods.feature import _FeatureMethod
from kdlab.models.base import ModelOutput
from kdlab.models.cifar_resnet import CifarResNet
from kdlab.models.imagenet import ImageNetResNet
from kdlab.models.mobilenetv2 import MobileNetV2
from kdlab.models.resnet_bottleneck import BottleneckResNet
from kdlab.models.vgg import VGG
from kdlab.models.wrn import WideResNet

#: families whose CAT-KD student (the release's ``*_test`` model) draws its 1×1-conv classifier in the family's conv
#: initialisation loop, N(0, 2/K) for K classes: CIFAR ResNets, WRNs, VGGs, MobileNetV2, ResNet50, ImageNet ResNets;
#: the others (ShuffleNets, MobileNetV1, user models) keep their classifier's weights, whose PyTorch default
#: initialisation is the one the release's bias-free conv gets
FAN_OUT_CLASSIFIER = (CifarResNet, WideResNet, VGG, MobileNetV2, BottleneckResNet, ImageNetResNet)


def release_classifier(model: nn.Module) -> None:
    """Make ``model``'s classifier the one of CAT-KD's converted students (``conv_test``: a 1×1 convolution without
    bias): its bias held at 0 and not trained, and for :data:`FAN_OUT_CLASSIFIER` families its weights redrawn from
    N(0, 2/K). The logits are then ``W·pooled``, the average of the class activation maps, as released."""
    classifier = model.classifier  # type: ignore[union-attr]
    with torch.no_grad():
        if isinstance(model, FAN_OUT_CLASSIFIER):
            classifier.weight.normal_(0.0, math.sqrt(2.0 / classifier.out_features))
        if classifier.bias is not None:
            classifier.bias.zero_()
            classifier.bias.requires_grad_(False)


class CATKDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    cat_weight: float = Field(15.0, ge=0, description="weight β of the CAT term (release: 15 for resnet32x4→8x4)")
    resolution: int = Field(2, ge=1, description="side of the pooled CAMs (release CAM_RESOLUTION: 2 on CIFAR)")
    normalize: bool = Field(False, description="L2-normalise every pooled CAM (release IF_NORMALIZE, off on CIFAR)")
    release_classifier: bool = Field(
        True, description="the student's classifier as the release's converted students: no bias (held at 0) and, for "
        "CIFAR/ImageNet ResNets, WRNs, VGGs, MobileNetV2, N(0, 2/K) initial weights; false: the model's own classifier",
    )  # fmt: skip


@METHODS.register("catkd")
class CATKD(_FeatureMethod):
    """``ce_weight·CE + cat_weight·catkd(CAM_s, CAM_t)`` (:func:`kdlab.losses.catkd`).

    The CAMs are each model's final linear layer applied as a 1×1 convolution to its pre-pool map (the release's
    converted models, whose logits are the pooled CAMs); the student's CAMs use its own, trained classifier, the
    teacher's its frozen one (its bias, which the release drops, enters no term). No learnable parts beyond the
    student. By default (``release_classifier``) the student's classifier is the release's bias-free ``conv_test``
    (:func:`release_classifier`), so its logits are the pooled CAMs exactly.
    """

    Params = CATKDParams
    teacher_outputs = ("prepool",)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        for who, out in (("student", s_out), ("teacher", t_out)):
            if out.prepool.dim() < 3:
                raise ConfigError(f"catkd needs the {who}'s pre-pool feature map; it gives a vector "
                                  f"{tuple(out.prepool.shape)}")  # fmt: skip
        assert teacher is not None
        if self.params.release_classifier:
            release_classifier(student)
        self._classifiers = [student.classifier, teacher.classifier]  # a list: not registered, not saved

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.cat_weight:
            w_s, w_t = (c.weight for c in self._classifiers)
            cams_s = L.class_activation_maps(student.prepool, w_s)
            cams_t = L.class_activation_maps(teacher.prepool, w_t.detach())
            out["cat"] = p.cat_weight * L.catkd(cams_s, cams_t, p.resolution, p.normalize)
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
