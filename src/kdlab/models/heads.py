"""Reusing the teacher's classifier: a frozen linear layer and the deployment head of SimKD / IJCKD.

:class:`FrozenLinear` holds a classifier's weight and bias as *buffers*: it is an ``nn.Linear`` for every purpose
(forward, ``in_features``, state-dict keys ``weight`` / ``bias``) but has no parameters, so no optimizer can update it,
no gradient accumulates in it and weight decay never touches it — the teacher classifier is frozen for real, while
gradients still flow *through* it to the student's features.

:class:`ReusedClassifierHead` = connector + frozen teacher classifier. Attached to a student
(:meth:`kdlab.models.base.HeadMixin.attach_head`), it turns the student into "student backbone → connector → global
average pool → teacher classifier" (SimKD, Chen et al. 2022; ideal-joint-classifier-kd Alg. 2-3), which is what is
trained, evaluated and saved.

:class:`HeadMixin` gives :class:`~kdlab.models.base.ZooModel` and :class:`~kdlab.models.taps.TappedModel` their
head support; it lives here, with the head it builds, so that ``base`` → ``heads`` → ``connectors`` → ``output`` is
a one-way chain (no import cycle).
"""

from __future__ import annotations

import torch
from torch import nn

from kdlab.models.connectors import Connector
from kdlab.models.output import HEAD, ModelOutput, global_pool


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
        return out._replace(logits=self.classifier(pooled), prepool=fmap, pooled=pooled)


def head_from_state(state: dict[str, torch.Tensor], prefix: str) -> ReusedClassifierHead:
    """Rebuild a :class:`ReusedClassifierHead` from the ``prefix``-ed keys of a weights file."""
    w = state.get(f"{prefix}classifier.weight")
    if w is None:
        raise ValueError(f"no reused classifier under '{prefix}' in the state dict")
    connector = Connector.from_state(state, f"{prefix}connector.")
    return ReusedClassifierHead(connector, FrozenLinear(torch.zeros_like(w), state.get(f"{prefix}classifier.bias")))


class HeadMixin:
    """Deployment-head support shared by :class:`~kdlab.models.base.ZooModel` and
    :class:`~kdlab.models.taps.TappedModel`."""

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
            head = head_from_state(state, prefix)
            ref = next(iter(nn.Module.parameters(self)), None)  # type: ignore[arg-type]
            self.attach_head(head.to(ref.device) if ref is not None else head)
