"""Wide ResNets (WRN-d-k) of the standard CIFAR KD benchmark, written for kdlab.

Pre-activation blocks (BN-ReLU-conv), depth 6n+4, stage widths 16·k, 32·k, 64·k. Module names, state-dict order and
shapes equal the published zoo (RepDistiller / mdistiller ``wrn.py``; see ``shared/specs/cifar_zoo_state_dicts.json``):
each stage is ``blockN.layer.<i>``; a block whose input and output widths are equal has no ``convShortcut`` (so
``wrn_16_1`` has one state-dict entry fewer than ``wrn_16_2``); the final BN is the top-level ``bn1``.

The pre-pool map is ``relu(bn1(block3 output))`` (the map that is actually pooled; RepDistiller's ``is_feat``
``feats[-2]`` is the block3 output *before* that BN-ReLU). Pooling is a global average (the reference code's
``avg_pool2d(·, 8)`` is the same thing on 32×32 inputs). Initialisation as in the reference: conv weights
N(0, 2/(k·k·out_channels)), BN weight 1 / bias 0, Linear bias 0 (weight: PyTorch default).

Stages: the ``block1..3`` outputs (RepDistiller / mdistiller ``feats[1:]``); pre-activations: each stage output
through the BatchNorm that follows it (the next stage's first ``bn1``, and the final ``bn1``), computed once, inside
the forward pass (mdistiller applies those BatchNorms a second time, which in training updates their running
statistics twice).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3×3-BN-ReLU-conv3×3 with identity or 1×1 ``convShortcut`` (applied to the activated input)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, bn1(x))``: ``bn1(x)`` is the pre-activation of this block's input (the previous stage's
        output, WRN being a pre-activation network)."""
        pre = self.bn1(x)
        act = F.relu(pre)
        return self._rest(x, act), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._rest(x, self.relu1(self.bn1(x)))

    def _rest(self, x: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``layer`` is an ``nn.Sequential`` of :class:`WideBasicBlock` (the name is part of the zoo's keys)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(n)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation of the input)`` (see :meth:`WideBasicBlock.forward_pre`)."""
        x, pre = self.layer[0].forward_pre(x)
        for i in range(1, len(self.layer)):
            x = self.layer[i](x)
        return x, pre


class WideResNet(ZooModel):
    """WRN-depth-widen_factor for 32×32 inputs."""

    classifier_name = "fc"

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        f1 = self.block1(self.conv1(x))
        f2, p1 = self.block2.forward_pre(f1)
        f3, p2 = self.block3.forward_pre(f2)
        p3 = self.bn1(f3)
        fmap = F.relu(p3)
        pooled = fmap.mean(dim=(2, 3))
        return ModelOutput(self.fc(pooled), fmap, pooled, (f1, f2, f3), (p1, p2, p3))

    def stage_norms(self) -> list[nn.Module]:
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]
