"""The one interface through which kdlab sees every model: logits, pre-pool map, pooled feature, classifier.

Two kinds of model implement it:

* :class:`ZooModel`, kdlab's own architectures, which compute the three outputs in :meth:`ZooModel.backbone_features`;
* :class:`kdlab.models.taps.TappedModel`, any user ``nn.Module`` seen through forward hooks.

Both can carry a *deployment head* (:class:`kdlab.models.heads.ReusedClassifierHead`, registered as the sub-module
``kd_head``): a connector plus the frozen classifier of a teacher, as trained by SimKD / IJCKD. With a head, the
model's features become the connector's output and its logits those of the reused classifier, so the distilled
student is a self-contained model (its weights file holds the head; no teacher is needed at test time).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

HEAD = "kd_head"
"""Name of the sub-module holding a deployment head; its weights are saved as ``kd_head.*`` next to the model's."""


class ModelOutput(NamedTuple):
    """What a forward pass exposes.

    ``prepool``: the map that is pooled into the penultimate vector (N×C×H×W for CNNs, N×C×L for 1-D CNNs; for
    vector models the last hidden vector itself). ``pooled``: the penultimate vector, N×D. ``logits`` =
    ``classifier(pooled)``.
    """

    logits: torch.Tensor
    prepool: torch.Tensor
    pooled: torch.Tensor


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over every dimension after the channels (N×C×… → N×C); vectors are returned unchanged."""
    return x if x.dim() == 2 else x.flatten(2).mean(dim=2)


class HeadMixin:
    """Deployment-head support shared by :class:`ZooModel` and :class:`~kdlab.models.taps.TappedModel`."""

    _modules: dict[str, nn.Module | None]

    @property
    def head(self) -> nn.Module | None:
        """The attached deployment head, or ``None``."""
        return self._modules.get(HEAD)

    def attach_head(self, head: nn.Module) -> None:
        """Route this model's outputs through ``head`` (replaces any previous head)."""
        nn.Module.add_module(self, HEAD, head)  # type: ignore[arg-type]

    def detach_head(self) -> nn.Module | None:
        """Remove and return the head (the model gives its own logits again)."""
        return self._modules.pop(HEAD, None)

    def _through_head(self, out: ModelOutput) -> ModelOutput:
        head = self.head
        return out if head is None else head(out)

    def adapt_to_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Attach the head described by ``state`` (``kd_head.*`` keys) before a strict load.

        Called by :func:`kdlab.engine.checkpoint.load_into`, so a distilled student's weights file loads into a plain
        ``kdlab.models.build(name)`` and predicts exactly as it did at the end of training.
        """
        prefix = HEAD + "."
        if self.head is None and any(k.startswith(prefix) for k in state):
            from kdlab.models.heads import head_from_state

            head = head_from_state(state, prefix)
            ref = next(iter(nn.Module.parameters(self)), None)  # type: ignore[arg-type]
            self.attach_head(head.to(ref.device) if ref is not None else head)


class ZooModel(HeadMixin, nn.Module):
    """Base of kdlab's own models: ``forward`` returns logits, ``forward_features`` returns a :class:`ModelOutput`.

    Subclasses set ``classifier_name``, the module path of the final ``nn.Linear``, and implement
    :meth:`backbone_features` (their own classifier's outputs).
    """

    classifier_name: str = "fc"

    def backbone_features(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        """Logits, pre-pool map and pooled feature (through the deployment head when one is attached)."""
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
