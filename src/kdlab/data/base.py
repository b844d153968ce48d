"""The one data interface the engine sees (:class:`DataSource`) and its resident implementation (:class:`Dataset`).

A :class:`DataSource` yields batches of ``(x, y, index)``: training batches of an epoch (seeded shuffle, optional
sharding across ranks, augmentation a pure function of ``(seed, epoch, index)``) and evaluation batches of a split.
Two kinds implement it: :class:`Dataset` holds tensors resident on the training device (MNIST-1D, CIFAR, user
tensors); :class:`kdlab.data.stream.StreamingDataset` decodes samples in DataLoader workers (image folders, ImageNet,
user ``torch.utils.data.Dataset`` objects). The engine never asks which kind it has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from kdlab.errors import ConfigError, DataError
from kdlab.registry import Registry
from kdlab.trust import import_object, is_import_path

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


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # model inputs, labels, sample indices (on the device)
SPLITS = ("train", "test")


@runtime_checkable
class DataSource(Protocol):
    """What the engine, the teacher cache and the instruments read; implemented by resident and streaming data."""

    name: str
    num_classes: int
    noisy_indices: torch.Tensor | None
    clean_train_y: torch.Tensor | None

    @property
    def num_train(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def split_size(self, split: str) -> int: ...

    def labels(self, split: str) -> torch.Tensor: ...

    def set_train_labels(self, y: torch.Tensor) -> None: ...

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]: ...  # fmt: skip

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]: ...

    def example_batch(self, n: int = 2, split: str = "train") -> torch.Tensor: ...

    def strong_batch(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor: ...

    def take_first(self, train: int | None, test: int | None) -> DataSource: ...

    def to(self, device: torch.device | str) -> DataSource: ...


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got '{split}'")
    return split


@dataclass
class Dataset:
    """Resident data: a train and a test split as tensors, the number of classes and the batched input transform."""

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

    @property
    def num_train(self) -> int:
        return len(self.train)

    def _split(self, split: str) -> Split:
        return self.train if check_split(split) == "train" else self.test

    def split_size(self, split: str) -> int:
        return len(self._split(split))

    def labels(self, split: str) -> torch.Tensor:
        return self._split(split).y

    def set_train_labels(self, y: torch.Tensor) -> None:
        self.train = Split(self.train.x, y)

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]:  # fmt: skip
        """Augmented training batches of one epoch (see :func:`kdlab.data.loader.batches`)."""
        from kdlab.data.loader import batches

        return batches(self.train, self.transform, batch_size, train=True, seed=seed, epoch=epoch,
                       start_batch=start_batch, indices=indices, shard=shard, augment_seed=augment_seed,
                       augment_epoch=augment_epoch)  # fmt: skip

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of ``split`` in order (or of ``indices`` of it), evaluation transform only."""
        from kdlab.data.loader import batches

        return batches(self._split(split), self.transform, batch_size, train=False, indices=indices)

    def example_batch(self, n: int = 2, split: str = "train") -> torch.Tensor:
        """The first ``n`` samples of ``split`` as model inputs (evaluation transform)."""
        return self.transform.eval_batch(self._split(split).x[:n])

    def strong_batch(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """A second, strongly augmented view of training samples ``index`` (two-view methods such as MLKD)."""
        strong = getattr(self.transform, "strong_batch", None)
        if strong is None:
            raise ConfigError(f"dataset '{self.name}' has no strong view for two-view methods")
        return strong(self.train.x[index], index, seed, epoch)

    def take_first(self, train: int | None, test: int | None) -> Dataset:
        """Keep only the first ``train`` / ``test`` samples of each split (``None``: all)."""
        self.train = Split(self.train.x[:train], self.train.y[:train])
        self.test = Split(self.test.x[:test], self.test.y[:test])
        return self

    def to(self, device: torch.device | str) -> Dataset:
        """Move both splits to ``device`` (the data then stays resident there for the whole run)."""
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.num_classes, self.transform,
                       self.noisy_indices, self.clean_train_y)  # fmt: skip


DatasetBuilder = Callable[["DataConfig"], DataSource]
DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def build_dataset(cfg: DataConfig) -> DataSource:
    """Build the dataset named by ``cfg.name``: a registry name, or a user builder ``module:function`` /
    ``file.py:function`` (:mod:`kdlab.data.user`, trust-checked). Resident tensors stay on the CPU until
    :meth:`DataSource.to`.

    With ``cfg.val_split`` > 0 part of the training set is held out as the ``val`` split
    (:mod:`kdlab.data.holdout`); with ``cfg.read_test`` false the test split cannot be read.
    With ``cfg.label_noise`` > 0 the training labels are flipped by :func:`kdlab.data.noise.flip_labels`; the
    flipped indices are kept in ``dataset.noisy_indices`` and the clean labels in ``dataset.clean_train_y``.
    """
    if is_import_path(cfg.name):
        from kdlab.data.user import build_user_dataset

        ds = build_user_dataset(cfg, import_object(cfg.name, what="data.name"))
    else:
        ds = DATASETS.get(cfg.name)(cfg)
    if cfg.max_train_samples is not None or cfg.max_test_samples is not None:
        ds = ds.take_first(cfg.max_train_samples, cfg.max_test_samples)
    transform = getattr(ds, "transform", None)
    if cfg.val_split:  # before label noise: the val split keeps the given labels, the noise flips the rest
        from kdlab.data.holdout import HeldOut

        ds = HeldOut(ds, cfg.val_split, cfg.val_seed, read_test=cfg.read_test)
    if hasattr(transform, "strong"):  # the strong-view policy of two-view methods (kdlab.data.strong)
        transform.strong = cfg.strong_augment  # type: ignore[union-attr]
    if cfg.label_noise > 0:
        from kdlab.data.noise import flip_labels

        clean = ds.labels("train")
        noisy, idx = flip_labels(clean, ds.num_classes, cfg.label_noise, cfg.label_noise_seed)
        ds.set_train_labels(noisy)
        ds.clean_train_y = clean
        ds.noisy_indices = idx
    return ds
