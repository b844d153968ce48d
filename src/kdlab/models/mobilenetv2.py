"""MobileNetV2 of the standard CIFAR KD benchmark: ``mobile_half`` (expansion T = 6, width 0.5), written for kdlab.

Same module names and shapes as RepDistiller / mdistiller ``mobilenetv2.py`` (``conv1``, ``blocks.<stage>.<i>.conv``,
``conv2``, classifier ``classifier.0`` — a Linear inside an ``nn.Sequential``), see
``shared/specs/cifar_zoo_state_dicts.json``. The pre-pool map is the ``conv2`` output (1×1 conv-BN-ReLU to 1280
channels, 2×2 for 32×32 inputs), not RepDistiller's ``is_feat`` ``feats[-2]``. Unlike the reference constructor this
one prints nothing. Initialisation as in the reference: conv N(0, 2/(k·k·out)), BN 1/0, Linear N(0, 0.01) bias 0.
Stages: the outputs of block groups 1, 2, 4, 6 (mdistiller); they end with a BatchNorm and no ReLU (linear
bottlenecks), so they are also the pre-activations.
"""

from __future__ import annotations


import torch
from torch import nn

from kdlab.models.init import init_normal_fan_out
from kdlab.models.base import ModelOutput, ZooModel

# expansion t, output channels c, repeats n, first stride s (the reference's ``interverted_residual_setting``)
SETTINGS = [(1, 16, 1, 1), ("T", 24, 2, 1), ("T", 32, 3, 2), ("T", 64, 4, 2), ("T", 96, 3, 1), ("T", 160, 3, 2),
            ("T", 320, 1, 1)]  # fmt: skip
STAGE_ENDS = (1, 2, 4, 6)  # block groups whose output is a stage feature (mdistiller ``feats[1:]``)


def _conv_bn_relu(inp: int, oup: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, k, stride, k // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expand - 3×3 depthwise - 1×1 linear projection, with a residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(ZooModel):
    """MobileNetV2 for 32×32 inputs (``T`` expansion, ``width_mult`` channel multiplier)."""

    classifier_name = "classifier.0"

    def __init__(self, num_classes: int = 100, T: int = 6, width_mult: float = 0.5) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTINGS:
            expand = T if t == "T" else int(t)
            out_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, out_channel, s if i == 0 else 1, expand))
                input_channel = out_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        init_normal_fan_out(self)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = self.conv1(x)
        stages = []
        for i, stage in enumerate(self.blocks):
            x = stage(x)
            if i in STAGE_ENDS:
                stages.append(x)
        fmap = self.conv2(x)
        pooled = fmap.mean(dim=(2, 3))
        return ModelOutput(self.own_classifier(pooled), fmap, pooled, tuple(stages), tuple(stages))

    def stage_norms(self) -> list[nn.Module]:
        return [self.blocks[i][-1].conv[-1] for i in STAGE_ENDS]


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """The zoo's ``MobileNetV2``: T = 6, width 0.5 (812,836 parameters at 100 classes)."""
    return MobileNetV2(num_classes=num_classes, T=6, width_mult=0.5)
