"""Symmetric label noise (kl-vs-mse §6): a seeded fraction of training labels flipped to another class."""

from __future__ import annotations

import torch

from kdlab.seeding import generator


def flip_labels(y: torch.Tensor, num_classes: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(noisy_labels, flipped_indices)``.

    Exactly ``round(fraction · N)`` samples, chosen uniformly without replacement, get a label drawn uniformly from
    the *other* ``num_classes − 1`` classes. A pure function of ``(y, num_classes, fraction, seed)``.
    """
    n = len(y)
    k = int(round(fraction * n))
    g = generator(seed, "label-noise", n, num_classes)
    idx = torch.randperm(n, generator=g)[:k].sort().values
    shift = torch.randint(1, num_classes, (k,), generator=g)  # never 0: the new label always differs
    noisy = y.clone()
    noisy[idx] = (y[idx].cpu() + shift).remainder(num_classes).to(y.device)
    return noisy, idx
