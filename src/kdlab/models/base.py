"""The one interface through which kdlab sees every model: logits, pre-pool map, pooled feature, classifier."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class ModelOutput(NamedTuple):
    """What a forward pass exposes.

    ``prepool``: the map that is pooled into the penultimate vector (N×C×H×W for CNNs, N×C×L for 1-D CNNs; for
    vector models the last hidden vector itself). ``pooled``: the penultimate vector, N×D. ``logits`` =
    ``classifier(pooled)``.
    """

    logits: torch.Tensor
    prepool: torch.Tensor
    pooled: torch.Tensor


class ZooModel(nn.Module):
    """Base of kdlab's own models: ``forward`` returns logits, ``forward_features`` returns a :class:`ModelOutput`.

    Subclasses set ``classifier_name``, the module path of the final ``nn.Linear``.
    """

    classifier_name: str = "fc"

    def forward_features(self, x: torch.Tensor) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits

    @property
    def classifier(self) -> nn.Linear:
        """The final linear classifier (shared, not a copy)."""
        module = self.get_submodule(self.classifier_name)
        assert isinstance(module, nn.Linear)
        return module


def num_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters())
