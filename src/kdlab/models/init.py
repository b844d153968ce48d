"""The weight initialisations of the zoo's model families (one function each, shared by the files that use them)."""

from __future__ import annotations

import math

from torch import nn


def init_kaiming_fan_out(model: nn.Module) -> None:
    """The ResNet initialisation (CIFAR zoo and torchvision): conv weights Kaiming normal (fan-out, ReLU gain),
    BatchNorm 1 / 0; everything else keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_normal_fan_out(model: nn.Module) -> None:
    """The VGG / MobileNetV2 initialisation of the standard zoo: conv weights N(0, √(2 / (k·k·out))), zero conv bias,
    BatchNorm 1 / 0, Linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
