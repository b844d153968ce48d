"""Batch plans (shuffle, subset, shard) and batch iteration over resident tensors: ``(x, y, index)`` batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from kdlab.data.base import Split, Transform
from kdlab.seeding import generator


def epoch_order(n: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The shuffled sample order of one epoch: a pure function of ``(seed, epoch)``."""
    return torch.randperm(n, generator=generator(seed, "shuffle", epoch)).to(device)


def batch_plan(
    n: int,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    indices: torch.Tensor | None = None,
    shard: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """The sample indices of each batch, shared by resident and streaming data.

    Training follows :func:`epoch_order`, evaluation is in order; ``indices`` restricts iteration to a subset,
    ``start_batch`` skips batches and ``shard`` maps each global batch to this process's part of it. The last
    partial batch is kept.
    """
    if indices is None:
        order = epoch_order(n, seed, epoch, device) if train else torch.arange(n, device=device)
    else:
        order = indices.to(device)
    for start in range(start_batch * batch_size, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx if shard is None else shard(idx)


def batches(
    split: Split,
    transform: Transform,
    batch_size: int,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    indices: torch.Tensor | None = None,
    shard: Callable[[torch.Tensor], torch.Tensor] | None = None,
    augment_seed: int | None = None,
    augment_epoch: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, index)`` batches of resident ``split`` in the order of :func:`batch_plan`.

    Training batches are augmented, evaluation batches only normalised. The augmentation stream is keyed by
    ``(augment_seed, augment_epoch)`` (default: ``seed``, ``epoch``), which a teacher cache pins to its views.
    """
    plan = batch_plan(len(split), batch_size, train=train, seed=seed, epoch=epoch, start_batch=start_batch,
                      indices=indices, shard=shard, device=split.x.device)  # fmt: skip
    for idx in plan:
        x = split.x[idx]
        if train:
            a_seed = seed if augment_seed is None else augment_seed
            x = transform.train_batch(x, idx, a_seed, epoch if augment_epoch is None else augment_epoch)
        else:
            x = transform.eval_batch(x)
        yield x, split.y[idx], idx


def num_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size
