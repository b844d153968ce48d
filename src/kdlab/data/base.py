"""Core data containers: a dataset is two tensor splits plus the transform that turns raw rows into model inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from kdlab.errors import DataError
from kdlab.registry import Registry

if TYPE_CHECKING:
    from kdlab.config import DataConfig


class Transform(Protocol):
    """Turns a raw batch (as stored) into model inputs; training batches may be augmented."""

    def train_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor: ...

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Split:
    """Rows ``x`` as stored (uint8 images N×C×H×W or float vectors) and int64 labels ``y``."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"data has {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.x) == 0:
            raise DataError("data split is empty")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.x)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


@dataclass
class Dataset:
    """A train and a test split, the number of classes and the input transform."""

    name: str
    train: Split
    test: Split
    num_classes: int
    transform: Transform
    noisy_indices: torch.Tensor | None = None  # training samples whose label was flipped (label noise)
    clean_train_y: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for split_name, split in (("train", self.train), ("test", self.test)):
            lo, hi = int(split.y.min()), int(split.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise DataError(
                    f"{self.name} {split_name} labels must lie in [0, {self.num_classes - 1}], found [{lo}, {hi}]"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """Move both splits to ``device`` (the data then stays resident there for the whole run)."""
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.num_classes, self.transform,
                       self.noisy_indices, self.clean_train_y)  # fmt: skip


DatasetBuilder = Callable[["DataConfig"], Dataset]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def build_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset named by ``cfg.name`` (tensors on the CPU; move with :meth:`Dataset.to`).

    With ``cfg.label_noise`` > 0 the training labels are flipped by :func:`kdlab.data.noise.flip_labels`; the
    flipped indices are kept in ``dataset.noisy_indices`` and the clean labels in ``dataset.clean_train_y``.
    """
    ds = DATASETS.get(cfg.name)(cfg)
    if cfg.label_noise > 0:
        from kdlab.data.noise import flip_labels

        noisy, idx = flip_labels(ds.train.y, ds.num_classes, cfg.label_noise, cfg.label_noise_seed)
        ds.clean_train_y = ds.train.y
        ds.train = Split(ds.train.x, noisy)
        ds.noisy_indices = idx
    return ds
