"""Datasets as tensors, batches of ``(x, y, index)``, batched on-device augmentation.

``build_dataset(cfg)`` returns a :class:`~kdlab.data.base.Dataset`; :func:`~kdlab.data.loader.batches` iterates it.
"""

from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageAugment, VectorTransform
from kdlab.data.base import DATASETS, Dataset, Split, build_dataset
from kdlab.data.loader import batches

# registering side effects
from kdlab.data import cifar as _cifar  # noqa: F401  (isort: skip)
from kdlab.data import mnist1d as _mnist1d  # noqa: F401  (isort: skip)
from kdlab.data import synthetic as _synthetic  # noqa: F401  (isort: skip)

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "Dataset",
    "ImageAugment",
    "Split",
    "VectorTransform",
    "batches",
    "build_dataset",
]
