"""ShuffleNetV1 (groups 3) and ShuffleNetV2 (1×) of the standard CIFAR KD benchmark, written for kdlab.

Module names and shapes equal RepDistiller / mdistiller ``ShuffleNetv1.py`` / ``ShuffleNetv2.py`` (see
``shared/specs/cifar_zoo_state_dicts.json``); the classifier is ``linear``. Pre-pool maps: ShuffleV1 — the layer3
output (960 channels, no 1×1 conv before pooling); ShuffleV2 — ``relu(bn2(conv2(layer3 output)))`` (1024 channels).
Initialisation is PyTorch's default, as in the reference code. Stages: ``layer1..3`` outputs; pre-activations as
mdistiller's ``preact_feats`` (no OFD margins: mdistiller does not support ShuffleNets as OFD teachers either).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel, run_stages


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, C, H, W] → [N, g, C/g, H, W] → transpose → [N, C, H, W]."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleBlock(nn.Module):
    """Channel shuffle as a (parameter-free) module, as in the reference."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


# ---------------------------------------------------------------------------------------------------------------- V1


class ShuffleV1Bottleneck(nn.Module):
    """Grouped 1×1 - shuffle - depthwise 3×3 - grouped 1×1; stride 2 concatenates an avg-pooled shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = int(out_planes / 4)
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ShuffleBlock(g)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the sum (or concatenation) before the final ReLU."""
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return F.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pre(x)[0]


class ShuffleNetV1(ZooModel):
    """ShuffleNet(V1) for 32×32 inputs."""

    classifier_name = "linear"

    def __init__(self, out_planes: tuple[int, int, int] = (240, 480, 960), num_blocks: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            cat_planes = self.in_planes if i == 0 else 0  # stride-2 blocks concatenate their input
            layers.append(ShuffleV1Bottleneck(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        fmap, out = run_stages([self.layer1, self.layer2, self.layer3], x)
        pooled = fmap.mean(dim=(2, 3))
        return out._replace(logits=self.linear(pooled), prepool=fmap, pooled=pooled)


# ---------------------------------------------------------------------------------------------------------------- V2


class ShuffleV2Block(nn.Module):
    """Split channels in half; 1×1-dw3×3-1×1 on one half; concatenate; shuffle."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(2)

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``; the pre-activation is ``cat(x1, bn3(…))`` *before* the shuffle, as in
        mdistiller's ``preact_feats``."""
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        return self.shuffle(torch.cat([x1, F.relu(pre)], 1)), torch.cat([x1, pre], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.shuffle(torch.cat([x1, out], 1))


class ShuffleV2DownBlock(nn.Module):
    """Stride-2 block: both branches downsample, then concatenate and shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(ZooModel):
    """ShuffleNetV2 (net size 1: stages 116/232/464, 1024-d head) for 32×32 inputs."""

    classifier_name = "linear"

    def __init__(self, out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 num_blocks: tuple[int, int, int] = (3, 7, 3), num_classes: int = 100) -> None:  # fmt: skip
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownBlock(self.in_channels, out_channels)]
        layers += [ShuffleV2Block(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x, out = run_stages([self.layer1, self.layer2, self.layer3], x)
        fmap = F.relu(self.bn2(self.conv2(x)))
        pooled = fmap.mean(dim=(2, 3))
        return out._replace(logits=self.linear(pooled), prepool=fmap, pooled=pooled)
