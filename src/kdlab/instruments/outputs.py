"""What the instruments measure: a model's logits and penultimate features on a dataset split.

Every model is seen through ``forward_features(x) -> ModelOutput(logits, prepool, pooled)``; the instruments use the
logits ``z`` and the pooled penultimate vector ``r`` (the "pre-logit" of kl-vs-mse §4.3). Inputs go through the
evaluation transform (no augmentation) and the model runs in eval mode under ``torch.inference_mode()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdlab.data import DataSource
from kdlab.seeding import generator


@dataclass
class Outputs:
    """Per-sample outputs of one model on ``n`` samples: ``logits`` n×K, ``features`` n×D, ``labels`` n.

    ``features`` is None for a model without a penultimate feature (an ensemble teacher averages logits only).
    """

    logits: torch.Tensor
    features: torch.Tensor | None
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def subset_indices(n: int, max_samples: int | None, seed: int = 0) -> torch.Tensor | None:
    """A fixed random subset of ``max_samples`` of ``n`` indices (sorted), or ``None`` for all of them."""
    if max_samples is None or max_samples >= n:
        return None
    perm = torch.randperm(n, generator=generator(seed, "instruments", "subset"))
    return perm[:max_samples].sort().values


@torch.inference_mode()
def collect_outputs(
    model: nn.Module,
    data: DataSource,
    split: str,
    batch_size: int = 512,
    indices: torch.Tensor | None = None,
) -> Outputs:
    """Logits and pooled features of ``model`` on the ``split`` of ``data`` (or on ``indices`` of it), in sample
    order, on the CPU.

    The model is put in eval mode for the forward passes and its previous train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    logits, feats, labels = [], [], []
    try:
        for x, y, _ in data.eval_batches(split, batch_size, indices):
            out = model.forward_features(x)  # type: ignore[operator]
            logits.append(out.logits.float().cpu())
            if out.pooled is not None:
                feats.append(torch.flatten(out.pooled, 1).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    return Outputs(torch.cat(logits), torch.cat(feats) if feats else None, torch.cat(labels))
