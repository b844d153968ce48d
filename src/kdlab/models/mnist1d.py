"""MNIST-1D teacher CNN and student MLP: the CPU test bed of kdlab.

* ``mnist1d_cnn`` (teacher): three 1-D conv blocks (conv-BN-ReLU, 32/64/128 channels, kernel 5/3/3, strides 1/2/2)
  on the length-40 signal, global average pooling to a 128-d vector, linear classifier. 32,618 parameters at
  10 classes.
* ``mnist1d_mlp`` (student): 40 → 100 → 100 → classes with ReLU; the penultimate 100-d vector is both its
  "pre-pool" and pooled feature. 15,210 parameters at 10 classes.

Stages: the CNN's second and third conv blocks (N×C×L maps; the first block is the stem), pre-activations their
BatchNorm outputs; the MLP's two hidden vectors (N×100), pre-activations the Linear outputs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.models.base import ModelOutput, ZooModel


def _conv_block(cin: int, cout: int, k: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)
    )


class Mnist1dCNN(ZooModel):
    """1-D CNN teacher for length-40 MNIST-1D signals."""

    classifier_name = "fc"

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_block(1, widths[0], 5, 1), _conv_block(widths[0], widths[1], 3, 2), _conv_block(widths[1], widths[2], 3, 2)
        )
        self.fc = nn.Linear(widths[2], num_classes)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        stages, preacts = [], []
        for i, (conv, bn, _) in enumerate(self.features):
            pre = bn(conv(x))
            x = F.relu(pre)
            if i:  # the first block is the stem
                stages.append(x)
                preacts.append(pre)
        pooled = x.mean(dim=2)
        return ModelOutput(self.fc(pooled), x, pooled, tuple(stages), tuple(preacts))

    def stage_norms(self) -> list[nn.Module]:
        return [block[1] for block in self.features[1:]]


class Mnist1dMLP(ZooModel):
    """Two-hidden-layer MLP student for length-40 MNIST-1D signals."""

    classifier_name = "fc"

    def __init__(self, num_classes: int = 10, in_features: int = 40, hidden: int = 100) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(hidden, num_classes)

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:
        p1 = self.body[0](torch.flatten(x, 1))
        h1 = F.relu(p1)
        p2 = self.body[2](h1)
        h = F.relu(p2)
        return ModelOutput(self.fc(h), h, h, (h1, h), (p1, p2))
