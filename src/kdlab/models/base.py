"""The one interface through which kdlab sees every model: logits, pre-pool map, pooled feature, classifier, and
the stage features (:class:`~kdlab.models.output.ModelOutput`).

Two kinds of model implement it:

* :class:`ZooModel`, kdlab's own architectures, which compute the outputs in :meth:`ZooModel.backbone_features`;
* :class:`kdlab.models.taps.TappedModel`, any user ``nn.Module`` seen through forward hooks.

Both can carry a *deployment head* (:class:`kdlab.models.heads.ReusedClassifierHead`, registered as the sub-module
``kd_head``): a connector plus the frozen classifier of a teacher, as trained by SimKD / IJCKD. With a head, the
model's features become the connector's output and its logits those of the reused classifier, so the distilled
student is a self-contained model (its weights file holds the head; no teacher is needed at test time).

Imports run one way: ``base`` → ``heads`` → ``connectors`` → ``output`` (:class:`ModelOutput`, :func:`global_pool`
and :data:`HEAD` are defined in :mod:`kdlab.models.output` and re-exported here).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.models.heads import HeadMixin
from kdlab.models.output import HEAD, ModelOutput, global_pool


class ZooModel(HeadMixin, nn.Module):
    """Base of kdlab's own models: ``forward`` returns logits, ``forward_features`` returns a :class:`ModelOutput`.

    Subclasses set ``classifier_name``, the module path of the final ``nn.Linear``, and implement
    :meth:`backbone_features` (their own classifier's outputs, with ``stages`` and ``preacts``) and, where OFD's
    margins make sense, :meth:`stage_norms`.
    """

    classifier_name: str = "fc"

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def stage_norms(self) -> list[nn.Module]:
        """The BatchNorm layer that produces each of ``preacts`` (mdistiller's ``get_bn_before_relu``): OFD's
        margins are computed from their affine parameters."""
        raise ConfigError(f"{type(self).__name__} does not expose the BatchNorm layers before its stage ReLUs (OFD)")

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        """Logits, pre-pool map, pooled feature and stage features (through the deployment head when one is
        attached)."""
        return self._through_head(self.backbone_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits

    def get_submodule(self, target: str) -> nn.Module:
        """``nn.Module.get_submodule`` that walks ``_modules`` (so ``classifier.0`` works for MobileNetV2)."""
        return self if target == "" else submodule(self, target)

    @property
    def own_classifier(self) -> nn.Linear:
        """The model's own final ``nn.Linear`` (at ``classifier_name``), whether or not a head is attached."""
        module = submodule(self, self.classifier_name)
        assert isinstance(module, nn.Linear)
        return module

    @property
    def classifier(self) -> nn.Linear:
        """The final linear classifier (shared, not a copy): the head's reused classifier when a head is attached.

        (A property: for VGG / MobileNetV2 the zoo's module is itself called ``classifier`` and is reached through
        :attr:`own_classifier`.)
        """
        head = self.head
        return head.classifier if head is not None else self.own_classifier


def run_stages(stages: list[nn.Sequential], x: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
    """Run residual stages whose last block has ``forward_pre(x) -> (relu(pre), pre)``.

    Returns the last output and a partial :class:`ModelOutput` carrying only ``stages`` / ``preacts`` (the other
    fields ``None``), to be completed with ``_replace``. The computation is exactly that of the plain forward.
    """
    outs, pres = [], []
    for stage in stages:
        for i in range(len(stage) - 1):
            x = stage[i](x)
        x, pre = stage[len(stage) - 1].forward_pre(x)
        outs.append(x)
        pres.append(pre)
    return x, ModelOutput(None, None, None, tuple(outs), tuple(pres))  # type: ignore[arg-type]


def submodule(model: nn.Module, path: str) -> nn.Module:
    """The sub-module at a dotted ``path``, looked up in ``_modules`` (not shadowed by properties such as
    :attr:`ZooModel.classifier`)."""
    module = model
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None:
            raise AttributeError(f"{type(model).__name__} has no sub-module '{path}'")
        module = child
    return module


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["HEAD", "HeadMixin", "ModelOutput", "ZooModel", "global_pool", "num_params", "run_stages", "submodule"]
