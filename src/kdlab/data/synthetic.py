"""Synthetic CIFAR-shaped data (random uint8 images, random labels) for benchmarks and tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kdlab.data.augment import CIFAR100_MEAN, CIFAR100_STD, ImageAugment
from kdlab.data.base import DATASETS, Dataset, Split
from kdlab.seeding import generator

if TYPE_CHECKING:
    from kdlab.config import DataConfig


def synthetic_images(num_samples: int, num_classes: int, train_split: float = 0.8, augment: bool = True) -> Dataset:
    """Random 3×32×32 uint8 images with random labels, split ``train_split`` / rest, fixed seed."""
    g = generator(0, "synthetic", num_samples, num_classes)
    x = torch.randint(0, 256, (num_samples, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (num_samples,), generator=g)
    n_train = max(1, min(num_samples - 1, int(num_samples * train_split)))
    return Dataset(
        "synthetic", Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), num_classes,
        ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=n_train, enabled=augment),
    )  # fmt: skip


@DATASETS.register("synthetic")
def _build(cfg: DataConfig) -> Dataset:
    return synthetic_images(cfg.num_samples, cfg.num_classes, cfg.train_split, cfg.augment)
