"""ResNet50, CIFAR variant (RepDistiller / mdistiller ``resnetv2.py``), written for kdlab.

3×3 stem without max-pooling, Bottleneck stages [3, 4, 6, 3] at 64/128/256/512 (×4) channels, global average
pooling, classifier ``linear``. Names and shapes equal ``shared/specs/cifar_zoo_state_dicts.json``; the pre-pool map
is the layer4 output (N×2048×4×4 for 32×32). Initialisation as in the reference: Kaiming-normal (fan-out) convs,
BN 1/0, PyTorch's default Linear. Stages: ``layer1..4`` outputs; pre-activations: their last block's residual sum
before the ReLU (mdistiller).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel, run_stages
from kdlab.models.init import init_kaiming_fan_out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(self.expansion * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def _residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum before the final ReLU, added in place (nothing keeps the BatchNorm output)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out))
        pre += self.shortcut(x)
        return pre

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the residual sum before the final ReLU is the pre-activation."""
        pre = self._residual_sum(x)
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output alone: the same values, the ReLU in place."""
        return self._residual_sum(x).relu_()


class BottleneckResNet(ZooModel):
    """ResNet with Bottleneck blocks for 32×32 inputs (``ResNet50``: blocks (3, 4, 6, 3))."""

    classifier_name = "linear"

    def __init__(self, num_blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], 1)
        self.layer2 = self._make_layer(128, num_blocks[1], 2)
        self.layer3 = self._make_layer(256, num_blocks[2], 2)
        self.layer4 = self._make_layer(512, num_blocks[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            layers.append(Bottleneck(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        fmap, out = run_stages([self.layer1, self.layer2, self.layer3, self.layer4], x)
        pooled = torch.flatten(self.avgpool(fmap), 1)
        return out._replace(logits=self.linear(pooled), prepool=fmap, pooled=pooled)

    def stage_norms(self) -> list[nn.Module]:
        return [layer[-1].bn3 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]
