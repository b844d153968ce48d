"""Top-1 / top-5 accuracy and cross-entropy of any prediction function over a split (one place for every caller)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from kdlab.data import DataSource
from kdlab.errors import DataError


@torch.inference_mode()
def evaluate_split(
    predict: Callable[[torch.Tensor], torch.Tensor], data: DataSource, split: str, batch_size: int
) -> dict[str, float]:
    """``{"acc": top-1 %, "top5": top-5 %, "loss": mean cross-entropy}`` of ``predict(x) -> logits`` over the
    ``split`` of ``data`` (evaluation view, in order); counts stay on the device until the end. With ≤ 5 classes
    top-5 is 100 %. Samples a streamed dataset skipped (``data.skip_bad_images``) are not counted."""
    correct = correct5 = loss = count = None
    for x, y, _ in data.eval_batches(split, batch_size):
        logits = predict(x)
        if correct is None:
            correct, correct5, loss, count = (torch.zeros((), device=y.device) for _ in range(4))
        correct += (logits.argmax(1) == y).sum()
        correct5 += topk_correct(logits, y, 5)
        loss += F.cross_entropy(logits.float(), y, reduction="sum")
        count += len(y)
    if count is None:
        raise DataError(f"{data.name}: no {split} sample could be evaluated")
    n = count.item()
    return {"acc": 100.0 * correct.item() / n, "top5": 100.0 * correct5.item() / n, "loss": loss.item() / n}


def topk_correct(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Number of rows whose label is among the ``k`` largest logits (all rows when ``k`` ≥ the number of classes)."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == y.unsqueeze(1)).any(dim=1).sum()
