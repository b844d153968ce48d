"""Top-1 accuracy and cross-entropy of any prediction function over a dataset split (one place for every caller)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from kdlab.data import Split, batches
from kdlab.data.base import Transform


@torch.inference_mode()
def evaluate_split(
    predict: Callable[[torch.Tensor], torch.Tensor], split: Split, transform: Transform, batch_size: int
) -> dict[str, float]:
    """``{"acc": top-1 %, "loss": mean cross-entropy}`` of ``predict(x) -> logits`` over ``split`` (evaluation
    transform, in order); counts stay on the device until the end."""
    correct = torch.zeros((), device=split.x.device)
    loss = torch.zeros((), device=split.x.device)
    for x, y, _ in batches(split, transform, batch_size, train=False):
        logits = predict(x)
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
    n = len(split)
    return {"acc": 100.0 * correct.item() / n, "loss": loss.item() / n}
