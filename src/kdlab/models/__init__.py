"""Model registry: ``kdlab.models.build(name, num_classes=...)`` returns an ``nn.Module`` whose ``forward`` gives logits.

Every model — kdlab's zoo or a user's ``nn.Module`` — has ``forward_features(x) -> ModelOutput(logits, prepool,
pooled, stages, preacts)`` and a ``classifier`` (the final ``nn.Linear``). The zoo is the standard CIFAR KD benchmark (RepDistiller /
mdistiller names, parameter names and shapes: ``shared/specs/cifar_zoo_state_dicts.json``), the MNIST-1D test bed
and the ImageNet zoo under torchvision's names (``resnet18…152``, ``mobilenet_v1``; the older ``imagenet_…`` names are
aliases: :data:`ALIASES`, :mod:`kdlab.models.imagenet`). :data:`FAMILIES` says which name is which (``kdlab zoo``).
A name of the form ``package.module:Class`` or ``path/to/file.py:Class`` builds a user model seen through forward
hooks (:mod:`kdlab.models.taps`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.base import HEAD, ModelOutput, ZooModel, global_pool, num_params
from kdlab.models.cifar_resnet import CifarResNet
from kdlab.models.imagenet import IMAGENET_ALIASES, IMAGENET_MODELS
from kdlab.models.mnist1d import Mnist1dCNN, Mnist1dMLP
from kdlab.models.mobilenetv2 import mobile_half
from kdlab.models.resnet_bottleneck import BottleneckResNet
from kdlab.models.shufflenet import ShuffleNetV1, ShuffleNetV2
from kdlab.models.taps import TappedModel, build_user_model, is_user_model
from kdlab.models.vgg import CONFIGS as VGG_CONFIGS
from kdlab.models.vgg import VGG
from kdlab.models.wrn import WideResNet
from kdlab.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

for _depth in (8, 14, 20, 32, 44, 56, 110):
    MODELS.add(f"resnet{_depth}", partial(CifarResNet, _depth, (16, 16, 32, 64)))
for _depth in (8, 32):
    MODELS.add(f"resnet{_depth}x4", partial(CifarResNet, _depth, (32, 64, 128, 256)))
for _depth, _k in ((16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2), (40, 6)):
    MODELS.add(f"wrn_{_depth}_{_k}", partial(WideResNet, _depth, _k))  # listed by `kdlab zoo`


def _wrn(match: re.Match[str]) -> Callable[..., nn.Module]:
    """Any WRN-D-W the family allows: depth D = 6n + 4 (n ≥ 1), width W ≥ 1 (e.g. ``wrn_40_4``, ``wrn_22_8``)."""
    depth, width = int(match[1]), int(match[2])
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"a WRN needs depth 6n+4 ≥ 10 and width ≥ 1 (wrn_10_1, wrn_16_2, wrn_40_4, ...), "
                         f"got depth {depth}, width {width}")  # fmt: skip
    return partial(WideResNet, depth, width)


MODELS.add_family(r"wrn_(\d+)_(\d+)", _wrn)
for _name, _cfg in VGG_CONFIGS.items():
    MODELS.add(_name, partial(VGG, _cfg))
MODELS.add("MobileNetV2", mobile_half)
MODELS.add("ShuffleV1", ShuffleNetV1)
MODELS.add("ShuffleV2", ShuffleNetV2)
MODELS.add("ResNet50", partial(BottleneckResNet, (3, 4, 6, 3)))
MODELS.add("mnist1d_cnn", Mnist1dCNN)
MODELS.add("mnist1d_mlp", Mnist1dMLP)
for _name, _factory in IMAGENET_MODELS.items():
    MODELS.add(_name, _factory)
#: other names of zoo models, still accepted everywhere: alias → name (resolved as a family, so listings and
#: "choose from" messages show each model once, under its name)
ALIASES: dict[str, str] = dict(IMAGENET_ALIASES)
MODELS.add_family("|".join(map(re.escape, ALIASES)), lambda m: MODELS.get(ALIASES[m[0]]))

_CIFAR = [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)] + ["resnet8x4", "resnet32x4"]
_CIFAR += [f"wrn_{d}_{k}" for d, k in ((16, 1), (16, 2), (16, 4), (28, 2), (28, 4), (40, 1), (40, 2), (40, 6))]
_CIFAR += list(VGG_CONFIGS) + ["MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]
#: the zoo by family, for listings (``kdlab zoo``): key → (what it is, its input, its default class count, names)
FAMILIES: dict[str, tuple[str, str, int, list[str]]] = {
    "cifar": ("CIFAR zoo: RepDistiller / mdistiller names and state dicts (ResNet50 = mdistiller's CIFAR ResNet-50)",
              "3×32×32", 100, _CIFAR),
    "imagenet": ("ImageNet zoo: torchvision's names and state dicts (resnet50 is not the CIFAR ResNet50); mobilenet_v1 as the KD releases",
                 "3×224×224", 1000, list(IMAGENET_MODELS)),
    "mnist1d": ("MNIST-1D test bed", "1×40", 10, ["mnist1d_cnn", "mnist1d_mlp"]),
}  # fmt: skip


class ModelSpec(Protocol):
    """What :func:`build` reads from a config section (``kdlab.config.ModelConfig``)."""

    name: str
    classifier: str | None
    features: str | list[str] | None
    kwargs: dict[str, Any]


def build(
    name: str | ModelSpec,
    num_classes: int = 100,
    *,
    classifier: str | None = None,
    features: str | list[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the model registered as ``name`` with ``num_classes`` outputs.

    ``name`` may also be a config section (``cfg.model`` / ``cfg.teacher``), whose ``classifier``, ``features`` and
    ``kwargs`` are then used. For a user model (``module:Class`` / ``file.py:Class``), ``classifier`` (and optionally
    ``features``) name the modules tapped by forward hooks; ``kwargs`` go to the constructor.
    """
    if not isinstance(name, str):
        spec = name
        merged = dict(getattr(spec, "kwargs", None) or {}, **kwargs)
        return build(spec.name, num_classes, classifier=getattr(spec, "classifier", None),
                     features=getattr(spec, "features", None), **merged)  # fmt: skip
    if is_user_model(name):
        return build_user_model(name, num_classes, classifier, features, **kwargs)
    if classifier is not None or features is not None:
        raise ConfigError(
            f"model.classifier / model.features are for user models; '{name}' is a kdlab model with known taps"
        )
    factory = MODELS.get(name)
    try:
        return factory(num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"model.kwargs do not fit '{name}': {err}") from None


__all__ = [
    "ALIASES", "FAMILIES", "HEAD", "MODELS", "ModelOutput", "ModelSpec", "TappedModel", "ZooModel", "build",
    "global_pool", "num_params",
]  # fmt: skip
