"""VGG-BN for CIFAR (vgg8/11/13/16/19 of the standard KD benchmark; RepDistiller / mdistiller ``vgg*_bn``).

Five conv stages ``block0..block4`` (each an ``nn.Sequential`` of conv3×3(with bias)-BN-ReLU whose *last* ReLU is
removed and applied in ``forward``), max-pooling between stages 0-1, 1-2, 2-3 (and 3-4 only for 64×64 inputs, as in
the reference), global average pooling and a single ``nn.Linear`` named ``classifier``. Module names and shapes equal
``shared/specs/cifar_zoo_state_dicts.json``; the pre-pool map is ``relu(block4 output)`` (N×512×4×4 for 32×32).
Initialisation as in the reference: conv N(0, 2/(k·k·out)) with bias 0, BN 1/0, Linear N(0, 0.01) with bias 0.
Stages: ``relu(block1..4)`` before pooling; pre-activations: the ``block1..4`` outputs (mdistiller).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel
from kdlab.models.init import init_normal_fan_out

CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _stage(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])  # the stage ends with BN; its ReLU is applied in forward


class VGG(ZooModel):
    """VGG with batch norm for 32×32 (or 64×64) inputs."""

    classifier_name = "classifier"

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        self.block0 = _stage(cfg[0], 3)
        self.block1 = _stage(cfg[1], cfg[0][-1])
        self.block2 = _stage(cfg[2], cfg[1][-1])
        self.block3 = _stage(cfg[3], cfg[2][-1])
        self.block4 = _stage(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool3 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_normal_fan_out(self)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        h = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        p1 = self.block1(x)
        f1 = F.relu(p1)
        p2 = self.block2(self.pool1(f1))
        f2 = F.relu(p2)
        p3 = self.block3(self.pool2(f2))
        f3 = F.relu(p3)
        p4 = self.block4(self.pool3(f3) if h == 64 else f3)
        fmap = F.relu(p4)
        pooled = torch.flatten(self.pool4(fmap), 1)
        return ModelOutput(self.own_classifier(pooled), fmap, pooled, (f1, f2, f3, fmap), (p1, p2, p3, p4))

    def stage_norms(self) -> list[nn.Module]:
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]
