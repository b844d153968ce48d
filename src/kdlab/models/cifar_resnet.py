"""CIFAR ResNets of the standard KD benchmark (RepDistiller / mdistiller ``resnet.py``), written for kdlab.

Depth 6n+2 with BasicBlocks; stages 16-16-32-64 (``resnetN``) or 32-64-128-256 (``resnetNx4``). Module names, the
order of the state dict and parameter shapes match the published zoo checkpoints (see
``shared/specs/cifar_zoo_state_dicts.json``) so they load with ``strict=True``. Initialisation follows the same code:
Kaiming-normal (fan-out) convolutions, BatchNorm weight 1 / bias 0, PyTorch's default for the final Linear.
Stages: ``layer1..3`` outputs; pre-activations: their last block's residual sum before the ReLU (mdistiller).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel, run_stages
from kdlab.models.init import init_kaiming_fan_out


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def _residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum before the final ReLU, added in place (nothing keeps the BatchNorm output)."""
        out = self.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out))
        pre += x if self.downsample is None else self.downsample(x)
        return pre

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the residual sum before the final ReLU is the pre-activation."""
        pre = self._residual_sum(x)
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output alone: the same values, the ReLU in place (no pre-activation is kept)."""
        return self._residual_sum(x).relu_()


class CifarResNet(ZooModel):
    """ResNet-(6n+2) for 32×32 inputs."""

    classifier_name = "fc"

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * BasicBlock.expansion, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = self.relu(self.bn1(self.conv1(x)))
        x, out = run_stages([self.layer1, self.layer2, self.layer3], x)
        pooled = torch.flatten(self.avgpool(x), 1)
        return out._replace(logits=self.fc(pooled), prepool=x, pooled=pooled)

    def stage_norms(self) -> list[nn.Module]:
        return [layer[-1].bn2 for layer in (self.layer1, self.layer2, self.layer3)]
