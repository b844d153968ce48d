"""Datasets behind one interface: batches of ``(x, y, index)``, resident (tensors, batched on-device augmentation)
or streamed (image folders, ImageNet, user datasets; decoded in DataLoader workers).

``build_dataset(cfg)`` returns a :class:`~kdlab.data.base.DataSource`; the engine iterates it with
``train_batches`` / ``eval_batches`` and never asks which kind it is.
"""

from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageAugment, VectorTransform
from kdlab.data.base import DATASETS, DataSource, Dataset, Split, build_dataset
from kdlab.data.loader import batches

# registering side effects
from kdlab.data import cifar as _cifar  # noqa: F401  (isort: skip)
from kdlab.data import folder as _folder  # noqa: F401  (isort: skip)
from kdlab.data import mnist1d as _mnist1d  # noqa: F401  (isort: skip)
from kdlab.data import synthetic as _synthetic  # noqa: F401  (isort: skip)
from kdlab.data import webdataset as _webdataset  # noqa: F401  (isort: skip)

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASETS",
    "DataSource",
    "Dataset",
    "ImageAugment",
    "Split",
    "VectorTransform",
    "batches",
    "build_dataset",
]
