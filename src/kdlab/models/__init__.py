"""Model registry: ``kdlab.models.build(name, num_classes=...)`` returns an ``nn.Module`` whose ``forward`` gives logits.

Every zoo model also has ``forward_features(x) -> ModelOutput(logits, prepool, pooled)`` and a ``classifier`` (the
final ``nn.Linear``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from kdlab.models.base import ModelOutput, ZooModel, num_params
from kdlab.models.cifar_resnet import CifarResNet
from kdlab.models.mnist1d import Mnist1dCNN, Mnist1dMLP
from kdlab.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

for _depth in (8, 14, 20, 32, 44, 56, 110):
    MODELS.add(f"resnet{_depth}", partial(CifarResNet, _depth, (16, 16, 32, 64)))
for _depth in (8, 32):
    MODELS.add(f"resnet{_depth}x4", partial(CifarResNet, _depth, (32, 64, 128, 256)))
MODELS.add("mnist1d_cnn", Mnist1dCNN)
MODELS.add("mnist1d_mlp", Mnist1dMLP)


def build(name: str, num_classes: int = 100, **kwargs: object) -> nn.Module:
    """Build the model registered as ``name`` with ``num_classes`` outputs."""
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


__all__ = ["MODELS", "ModelOutput", "ZooModel", "build", "num_params"]
