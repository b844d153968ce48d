"""Reusing the teacher's classifier: a frozen linear layer and the deployment head of SimKD / IJCKD.

:class:`FrozenLinear` holds a classifier's weight and bias as *buffers*: it is an ``nn.Linear`` for every purpose
(forward, ``in_features``, state-dict keys ``weight`` / ``bias``) but has no parameters, so no optimizer can update it,
no gradient accumulates in it and weight decay never touches it — the teacher classifier is frozen for real, while
gradients still flow *through* it to the student's features.

:class:`ReusedClassifierHead` = connector + frozen teacher classifier. Attached to a student
(:meth:`kdlab.models.base.HeadMixin.attach_head`), it turns the student into "student backbone → connector → global
average pool → teacher classifier" (SimKD, Chen et al. 2022; ideal-joint-classifier-kd Alg. 2-3), which is what is
trained, evaluated and saved.
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.base import ModelOutput, global_pool
from kdlab.models.connectors import Connector


class FrozenLinear(nn.Linear):
    """An ``nn.Linear`` whose weight and bias are buffers (copied, never trained)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def copy_of(cls, linear: nn.Linear) -> FrozenLinear:
        """A frozen copy of ``linear`` (e.g. a teacher's classifier)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear classifier, got {type(linear).__name__}")
        return cls(linear.weight, linear.bias)

    def reset_parameters(self) -> None:  # nothing to initialise: the weights are given
        pass


class ReusedClassifierHead(nn.Module):
    """Connector followed by global average pooling and a frozen (teacher) classifier.

    ``forward(student_output)`` returns a :class:`ModelOutput` whose ``prepool`` is the connected map (in the
    teacher's feature space), ``pooled`` its global average and ``logits`` the frozen classifier applied to it.
    """

    def __init__(self, connector: Connector, classifier: FrozenLinear) -> None:
        super().__init__()
        self.connector = connector
        self.classifier = classifier

    def forward(self, out: ModelOutput) -> ModelOutput:
        fmap = self.connector(out.prepool)
        pooled = global_pool(fmap)
        return ModelOutput(self.classifier(pooled), fmap, pooled)


def head_from_state(state: dict[str, torch.Tensor], prefix: str) -> ReusedClassifierHead:
    """Rebuild a :class:`ReusedClassifierHead` from the ``prefix``-ed keys of a weights file."""
    w = state.get(f"{prefix}classifier.weight")
    if w is None:
        raise ValueError(f"no reused classifier under '{prefix}' in the state dict")
    connector = Connector.from_state(state, f"{prefix}connector.")
    return ReusedClassifierHead(connector, FrozenLinear(torch.zeros_like(w), state.get(f"{prefix}classifier.bias")))
