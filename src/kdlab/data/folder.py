"""Image folders (``data.name: imagefolder``) and ImageNet (``data.name: imagenet``), streamed from disk.

``data.root`` holds ``train/<class>/…`` and ``val/<class>/…`` (``test/`` is accepted when there is no ``val/``);
images are the files with a known extension (jpg, jpeg, png, webp, bmp, ppm, pgm, tif, tiff, gif; any case) found
recursively under a class folder, in sorted order. The class index is the position of the folder name in the sorted
list of ``train/`` class folders — torchvision's ImageFolder convention, so teachers trained elsewhere line up.
``imagenet`` additionally requires exactly 1000 classes and uses the ``imagenet`` transform.

Scanning is safe on a folder someone else made: a directory symlink is followed at most once per real directory
(cycle detection by device and inode, shared by the whole split), and each file — reached directly, through a file
symlink or a hard link — is counted once (the first in sorted order). An entry with an image extension that is not
a regular file (a FIFO, socket, device or broken symlink) is refused with one line naming it, or kept with
``data.skip_bad_images`` so that every read skips and counts it; images are read through :mod:`kdlab.fileio`
(regular files only, ``KDLAB_MAX_BYTES_IMAGE``).

Paths are kept as one byte buffer + offsets (not a list of Python strings), so worker processes share them
copy-on-write and memory does not grow with the number of images.
"""

from __future__ import annotations

import os
import stat
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdlab.data.augment import ImageAugment
from kdlab.data.base import DATASETS, DataSource
from kdlab.data.images import IMAGE_EXTENSIONS, ImageViews, build_image_transform, build_image_views
from kdlab.data.stream import BadSample, StreamingDataset, View
from kdlab.errors import ConfigError, DataError, KdlabError
from kdlab.fileio import check_file, read_bytes

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


@dataclass
class _Scan:
    """What a split's scan found so far: relative paths, (device, inode) of each file, directories visited, and the
    class folders (reached from another class through a link, a class folder is left to its own class)."""

    skip_bad: bool
    paths: list[str]
    keys: array
    visited: set[tuple[int, int]]
    classes: set[tuple[int, int]]

    def add(self, rel: str, key: tuple[int, int]) -> None:
        self.paths.append(rel)
        self.keys.extend(key)


def _images_under(folder: Path, scan: _Scan) -> int:
    """Append the image files below ``folder`` (recursively, sorted, each real directory once) to ``scan`` as paths
    relative to ``folder``'s parent; returns how many were appended (before de-duplication)."""
    before = len(scan.paths)
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue  # a dangling directory link: nothing to read below it
        key = (st.st_dev, st.st_ino)
        if key in scan.visited or (key in scan.classes and d != folder):
            continue  # a symlink loop, a directory linked twice (followed once), another class's folder
        scan.visited.add(key)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            raise DataError(f"image folder: cannot list {d}: {err.strerror or err}") from None
        rel_dir = os.path.relpath(d, folder.parent)
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(Path(e.path))
                continue
            if not e.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.join(rel_dir, e.name)
            try:
                fst = e.stat()  # follows a file symlink: the file it names is what is counted once
                regular, key = stat.S_ISREG(fst.st_mode), (fst.st_dev, fst.st_ino)
            except OSError:
                regular, key = False, (-1, -len(scan.paths) - 1)  # a broken symlink
            if not regular and not scan.skip_bad:
                try:
                    check_file(e.path, "image", what="image folder entry", error=DataError)  # names what it is
                except DataError as err:
                    raise DataError(f"{err} (set data.skip_bad_images=true to skip and count it)") from None
            scan.add(rel, key)
        stack.extend(reversed(subdirs))  # pre-order, sorted: os.walk's order
    return len(scan.paths) - before


def class_folders(split_dir: Path) -> list[str]:
    """Sorted class-folder names of a split (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise DataError(f"image folder: {split_dir} not found (expected train/<class>/… and val/<class>/…)")
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"image folder: {split_dir} has no class folders")
    return names


def scan_split(split_dir: Path, classes: list[str], skip_bad: bool = False) -> tuple[PathTable, np.ndarray]:
    """The images of ``classes`` under ``split_dir`` and their labels; every class folder must hold an image. A file
    reached twice (symlinks, hard links) is kept once, under the first class and path in sorted order."""
    class_keys = set()
    for name in classes:
        st = os.stat(split_dir / name)
        class_keys.add((st.st_dev, st.st_ino))
    scan = _Scan(skip_bad, [], array("q"), set(), class_keys)
    counts = []
    for name in classes:
        n = _images_under(split_dir / name, scan)
        if not n:
            raise DataError(f"image folder: class folder {split_dir / name} holds no images "
                            f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS[:4])}, …)")  # fmt: skip
        counts.append(n)
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
    keys = np.frombuffer(scan.keys, dtype=np.int64).reshape(-1, 2)
    _, first = np.unique(keys, axis=0, return_index=True)
    if len(first) < len(keys):  # the same file reached twice: keep its first (sorted) occurrence
        keep = np.sort(first)
        paths = [scan.paths[i] for i in keep]
        return PathTable.pack(split_dir, paths), labels[keep]
    return PathTable.pack(split_dir, scan.paths), labels


def eval_dir(root: Path) -> Path:
    """The evaluation split folder: ``val/``, else ``test/``."""
    return root / "val" if (root / "val").is_dir() or not (root / "test").is_dir() else root / "test"


class ImageItems:
    """One split of an image folder: reads and renders sample ``index`` (in a DataLoader worker)."""

    def __init__(self, paths: PathTable, labels: np.ndarray, views: ImageViews) -> None:
        self.paths, self.labels, self.views = paths, labels, views

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        try:
            data = read_bytes(path, "image", what="image")  # a regular file within KDLAB_MAX_BYTES_IMAGE
        except KdlabError as err:
            raise BadSample(str(err)) from None
        return self.views.load(data, index, view, path), int(self.labels[index])


def load_image_folder(cfg: DataConfig, name: str = "imagefolder", expect_classes: int | None = None) -> DataSource:
    """Scan ``cfg.root`` and return a :class:`~kdlab.data.stream.StreamingDataset` over it."""
    if not cfg.root:
        raise DataError(f"{name}: set data.root to the folder holding train/<class>/… and val/<class>/…")
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"{name}: data root not found: {root}")
    transform = build_image_transform(cfg.transform or "imagenet", cfg.image_size, cfg.mean, cfg.std)
    classes = class_folders(root / "train")
    if expect_classes is not None and len(classes) != expect_classes:
        raise DataError(f"{name}: {root / 'train'} has {len(classes)} class folders, expected {expect_classes} "
                        "(use data.name=imagefolder for other image folders)")  # fmt: skip
    val_dir = eval_dir(root)
    eval_classes = class_folders(val_dir)
    if eval_classes != classes:
        missing = sorted(set(classes) - set(eval_classes))
        extra = sorted(set(eval_classes) - set(classes))
        raise DataError(f"{name}: the classes of {val_dir} differ from train/: missing {missing[:3] or 'none'}, "
                        f"extra {extra[:3] or 'none'} ({len(eval_classes)} vs {len(classes)} folders)")  # fmt: skip
    train_paths, train_y = scan_split(root / "train", classes, cfg.skip_bad_images)
    test_paths, test_y = scan_split(val_dir, classes, cfg.skip_bad_images)
    norm = ImageAugment(transform.mean, transform.std, num_samples=0, enabled=False)
    return StreamingDataset(
        name,
        {"train": ImageItems(train_paths, train_y, build_image_views(cfg, transform, cfg.augment)),
         "test": ImageItems(test_paths, test_y, build_image_views(cfg, transform))},
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
    if cfg.transform not in (None, "imagenet"):
        raise ConfigError(f"data.name=imagenet uses the imagenet transform; data.transform={cfg.transform} is for "
                          "data.name=imagefolder")  # fmt: skip
    return load_image_folder(cfg, "imagenet", IMAGENET_CLASSES)
