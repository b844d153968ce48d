"""Image folders (``data.name: imagefolder``) and ImageNet (``data.name: imagenet``), streamed from disk.

``data.root`` holds ``train/<class>/…`` and ``val/<class>/…`` (``test/`` is accepted when there is no ``val/``);
images are the files with a known extension (jpg, jpeg, png, webp, bmp, ppm, pgm, tif, tiff, gif; any case) found
recursively under a class folder, in sorted order. The class index is the position of the folder name in the sorted
list of ``train/`` class folders — torchvision's ImageFolder convention, so teachers trained elsewhere line up.
``imagenet`` additionally requires exactly 1000 classes and uses the ``imagenet`` transform.

Paths are kept as one byte buffer + offsets (not a list of Python strings), so worker processes share them
copy-on-write and memory does not grow with the number of images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdlab.data.augment import ImageAugment
from kdlab.data.base import DATASETS, DataSource
from kdlab.data.images import IMAGE_EXTENSIONS, ImageTransform, build_image_transform, decode, view_rng
from kdlab.data.stream import BadSample, StreamingDataset, View
from kdlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from kdlab.config import DataConfig

IMAGENET_CLASSES = 1000


@dataclass
class PathTable:
    """Relative file paths under ``root`` packed into one uint8 buffer with start offsets."""

    root: str
    blob: np.ndarray
    offsets: np.ndarray

    @classmethod
    def pack(cls, root: Path, rel_paths: list[str]) -> PathTable:
        encoded = [os.fsencode(p) for p in rel_paths]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return cls(str(root), np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes()))


def _images_under(folder: Path) -> list[str]:
    """Image files below ``folder`` (recursively), as sorted paths relative to ``folder``'s parent."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder.parent)
        found.extend(os.path.join(rel, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class-folder names of a split (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise DataError(f"image folder: {split_dir} not found (expected train/<class>/… and val/<class>/…)")
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"image folder: {split_dir} has no class folders")
    return names


def scan_split(split_dir: Path, classes: list[str]) -> tuple[PathTable, np.ndarray]:
    """The images of ``classes`` under ``split_dir`` and their labels; every class folder must hold an image."""
    rel_paths: list[str] = []
    labels: list[np.ndarray] = []
    for label, name in enumerate(classes):
        files = _images_under(split_dir / name)
        if not files:
            raise DataError(f"image folder: class folder {split_dir / name} holds no images "
                            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS[:4])}, …)")  # fmt: skip
        rel_paths.extend(files)
        labels.append(np.full(len(files), label, dtype=np.int64))
    return PathTable.pack(split_dir, rel_paths), np.concatenate(labels)


def _eval_dir(root: Path) -> Path:
    return root / "val" if (root / "val").is_dir() or not (root / "test").is_dir() else root / "test"


class ImageItems:
    """One split of an image folder: decodes and augments sample ``index`` (in a DataLoader worker)."""

    def __init__(self, paths: PathTable, labels: np.ndarray, transform: ImageTransform, augment: bool = True) -> None:
        self.paths, self.labels, self.transform, self.augment = paths, labels, transform, augment

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            img = decode(path)
        except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, …
            raise BadSample(f"unreadable image {path} ({type(err).__name__}: {err})") from None
        if view is None or not self.augment:
            x = self.transform.eval(img)
        else:
            kind, seed, epoch = view
            rng = view_rng(seed, kind, epoch, index)
            x = self.transform.strong(img, rng) if kind == "strong" else self.transform.train(img, rng)
        return x, int(self.labels[index])


def load_image_folder(cfg: DataConfig, name: str = "imagefolder", expect_classes: int | None = None) -> DataSource:
    """Scan ``cfg.root`` and return a :class:`~kdlab.data.stream.StreamingDataset` over it."""
    if not cfg.root:
        raise DataError(f"{name}: set data.root to the folder holding train/<class>/… and val/<class>/…")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{name}: data root not found: {root}")
    transform = build_image_transform(cfg.transform, cfg.image_size, cfg.mean, cfg.std)
    classes = class_folders(root / "train")
    if expect_classes is not None and len(classes) != expect_classes:
        raise DataError(f"{name}: {root / 'train'} has {len(classes)} class folders, expected {expect_classes} "
                        "(use data.name=imagefolder for other image folders)")  # fmt: skip
    eval_dir = _eval_dir(root)
    eval_classes = class_folders(eval_dir)
    if eval_classes != classes:
        missing = sorted(set(classes) - set(eval_classes))
        extra = sorted(set(eval_classes) - set(classes))
        raise DataError(f"{name}: the classes of {eval_dir} differ from train/: missing {missing[:3] or 'none'}, "
                        f"extra {extra[:3] or 'none'} ({len(eval_classes)} vs {len(classes)} folders)")  # fmt: skip
    train_paths, train_y = scan_split(root / "train", classes)
    test_paths, test_y = scan_split(eval_dir, classes)
    norm = ImageAugment(transform.mean, transform.std, num_samples=0, enabled=False)
    return StreamingDataset(
        name,
        {"train": ImageItems(train_paths, train_y, transform, cfg.augment),
         "test": ImageItems(test_paths, test_y, transform)},
        len(classes),
        input_shape=(3, transform.size, transform.size),
        finish=norm.eval_batch,
        labels={"train": torch.from_numpy(train_y), "test": torch.from_numpy(test_y)},
        workers=cfg.workers,
        prefetch=cfg.prefetch,
        skip_bad=cfg.skip_bad_images,
    )


@DATASETS.register("imagefolder")
def _build_imagefolder(cfg: DataConfig) -> DataSource:
    return load_image_folder(cfg)


@DATASETS.register("imagenet")
def _build_imagenet(cfg: DataConfig) -> DataSource:
    if cfg.transform != "imagenet":
        raise ConfigError(f"data.name=imagenet uses the imagenet transform; data.transform={cfg.transform} is for "
                          "data.name=imagefolder")  # fmt: skip
    return load_image_folder(cfg, "imagenet", IMAGENET_CLASSES)
