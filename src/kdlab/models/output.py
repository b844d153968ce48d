"""What a forward pass exposes (:class:`ModelOutput`) and the small helpers that read it.

This is the leaf of :mod:`kdlab.models`: it imports nothing from the package, so ``base``, ``heads``, ``connectors``
and ``taps`` all depend on it and not on each other in a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

HEAD = "kd_head"
"""Name of the sub-module holding a deployment head; its weights are saved as ``kd_head.*`` next to the model's."""

STAGE_FIELDS: tuple[str, ...] = ("stages", "preacts")
"""The multi-stage fields of :class:`ModelOutput` (a teacher cache does not hold them)."""


class ModelOutput(NamedTuple):
    """What a forward pass exposes.

    ``prepool``: the map that is pooled into the penultimate vector (N×C×H×W for CNNs, N×C×L for 1-D CNNs; for
    vector models the last hidden vector itself). ``pooled``: the penultimate vector, N×D. ``logits`` =
    ``classifier(pooled)``.

    ``stages``: the output of every stage, first to last, *without* the stem (mdistiller / RepDistiller ``feats[1:]``;
    e.g. ``layer1``, ``layer2``, ``layer3`` of a CIFAR ResNet). ``preacts``: the same stages before their final ReLU
    (mdistiller ``preact_feats[1:]``, RepDistiller ``preact=True``), used by OFD, AB and ReviewKD. Both are empty
    tuples for models that do not provide them. Zoo models compute them on the way (no extra work: the tensors exist
    anyway); user models collect them with forward hooks (``model.features`` naming several modules).
    """

    logits: torch.Tensor
    prepool: torch.Tensor
    pooled: torch.Tensor
    stages: tuple[torch.Tensor, ...] = ()
    preacts: tuple[torch.Tensor, ...] = ()


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over every dimension after the channels (N×C×… → N×C); vectors are returned unchanged."""
    return x if x.dim() == 2 else x.flatten(2).mean(dim=2)


def keep_fields(out: ModelOutput, fields: Iterable[str]) -> ModelOutput:
    """``out`` with only ``fields`` kept, each cloned (e.g. to leave ``torch.inference_mode``); the rest ``None``
    (tensor fields) or ``()`` (stage fields)."""
    wanted = set(fields)
    values = []
    for name, value in zip(ModelOutput._fields, out):
        if name in STAGE_FIELDS:
            values.append(tuple(t.clone() for t in value) if name in wanted and value else ())
        else:
            values.append(value.clone() if name in wanted and value is not None else None)
    return ModelOutput(*values)


__all__ = ["HEAD", "STAGE_FIELDS", "ModelOutput", "global_pool", "keep_fields"]
