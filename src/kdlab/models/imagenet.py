"""ImageNet zoo: torchvision's ResNets and the MobileNetV1 of the KD releases, written for kdlab (no torchvision).

Registered under torchvision's names, ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152`` and
``mobilenet_v1`` (timm's and the releases' name), with the earlier ``imagenet_…`` forms as aliases. None collides with
the CIFAR zoo (``resnet8/14/20/32/44/56/110``, ``resnet8x4/32x4``); mind the case of ``resnet50`` (this 224-pixel
torchvision network) against ``ResNet50`` (mdistiller's CIFAR ResNet-50, a 32×32 network).

* ResNets: torchvision's ``resnet.py`` layout and state-dict names (``conv1``, ``bn1``, ``layer1.0.conv1``, …,
  ``layerN.0.downsample.0/1``, ``fc``) and initialisation (Kaiming-normal fan-out convs, BN 1/0, default Linear), so a
  torchvision weights file (``resnet34-b627a593.pth``) loads strictly; 11,689,512 / 21,797,672 / 25,557,032 /
  44,549,160 / 60,192,808 parameters at 1000 classes. 7×7/2 stem + 3×3/2 max-pool; BasicBlock (18, 34) or
  Bottleneck with the stride on the 3×3 conv (torchvision's "ResNet v1.5").
* MobileNetV1 (width 1.0, 4,231,976 parameters): the layout of mdistiller / logit-standardization's
  ``models/imagenet/mobilenetv1.py`` (``model.0`` conv-BN-ReLU, ``model.1…13`` depthwise-separable blocks, ``fc``),
  with global instead of fixed 7×7 average pooling (no parameters; the same result at 224 px).

Stages (:class:`~kdlab.models.output.ModelOutput` ``stages`` / ``preacts``, as mdistiller's ImageNet models): ResNet
``layer1…4`` outputs and their last block's residual sum before the ReLU; MobileNetV1 blocks 3/5/11/13 (128/256/512/
1024 channels) after and before their last ReLU. MobileNetV1 keeps PyTorch's default initialisation, as the release.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from kdlab.models.base import ModelOutput, ZooModel, run_stages
from kdlab.models.init import init_kaiming_fan_out


class BasicBlock(nn.Module):
    """Two 3×3 convs (torchvision ``BasicBlock``)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def _residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum before the final ReLU, added in place (nothing keeps the BatchNorm output)."""
        out = self.relu(self.bn1(self.conv1(x)))
        pre = self.bn2(self.conv2(out))
        pre += x if self.downsample is None else self.downsample(x)
        return pre

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the residual sum before the final ReLU."""
        pre = self._residual_sum(x)
        return torch.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output alone: the same values, the ReLU in place."""
        return self._residual_sum(x).relu_()


class Bottleneck(nn.Module):
    """1×1 - 3×3 (strided) - 1×1 ×4 (torchvision ``Bottleneck``, stride on the 3×3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _residual_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The residual sum before the final ReLU, added in place (nothing keeps the BatchNorm output)."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        pre = self.bn3(self.conv3(out))
        pre += x if self.downsample is None else self.downsample(x)
        return pre

    def forward_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, pre-activation)``: the residual sum before the final ReLU."""
        pre = self._residual_sum(x)
        return torch.relu(pre), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The output alone: the same values, the ReLU in place."""
        return self._residual_sum(x).relu_()


class ImageNetResNet(ZooModel):
    """torchvision's ResNet for 224×224 inputs; ``block`` is :class:`BasicBlock` or :class:`Bottleneck`."""

    classifier_name = "fc"

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000) -> None:  # fmt: skip
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_kaiming_fan_out(self)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:  # fmt: skip
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        fmap, out = run_stages([self.layer1, self.layer2, self.layer3, self.layer4], x)
        pooled = torch.flatten(self.avgpool(fmap), 1)
        return out._replace(logits=self.fc(pooled), prepool=fmap, pooled=pooled)

    def stage_norms(self) -> list[nn.Module]:
        last = "bn3" if isinstance(self.layer1[-1], Bottleneck) else "bn2"
        return [getattr(layer[-1], last) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3×3 conv-BN-ReLU then pointwise 1×1 conv-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True),
    )  # fmt: skip


# (output channels, stride) of the 13 depthwise-separable blocks
MOBILENET_V1_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5
MOBILENET_V1_BLOCKS += [(1024, 2), (1024, 1)]
MOBILENET_V1_STAGE_ENDS = (3, 5, 11, 13)  # blocks that end a stage (mdistiller's feat1…feat4)


class MobileNetV1(ZooModel):
    """MobileNetV1 (width 1.0) as released with the ImageNet KD benchmark (mdistiller)."""

    classifier_name = "fc"

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, inp = [_conv_bn(3, 32, 2)], 32
        for oup, stride in MOBILENET_V1_BLOCKS:
            layers.append(_conv_dw(inp, oup, stride))
            inp = oup
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, num_classes)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        stages, preacts = [], []
        for i, block in enumerate(self.model):
            if i in MOBILENET_V1_STAGE_ENDS:  # the block's last BN output, then its ReLU (mdistiller's feats)
                pre = block[:-1](x)
                x = torch.relu(pre)
                stages.append(x)
                preacts.append(pre)
            else:
                x = block(x)
        pooled = x.mean(dim=(2, 3))
        return ModelOutput(self.fc(pooled), x, pooled, tuple(stages), tuple(preacts))

    def stage_norms(self) -> list[nn.Module]:
        return [self.model[i][-2] for i in MOBILENET_V1_STAGE_ENDS]


RESNETS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}
#: the ImageNet zoo under torchvision's (and timm's) names
IMAGENET_MODELS = {name: partial(ImageNetResNet, block, layers) for name, (block, layers) in RESNETS.items()}
IMAGENET_MODELS["mobilenet_v1"] = MobileNetV1
#: the names these models had before (``imagenet_resnet18`` …), still accepted: alias → name
PREFIX = "imagenet_"
IMAGENET_ALIASES = {f"{PREFIX}{name}": name for name in IMAGENET_MODELS}
