"""CIFAR-10/100 from what users have on disk, selected by ``data.root``.

Accepted layouts (checked in this order):

* a folder with ``train.npz`` and ``test.npz`` (``images`` uint8 N×32×32×3, ``fine_labels`` or ``labels``);
* the official pickle folder ``cifar-100-python/`` (``train``, ``test``) or ``cifar-10-batches-py/``
  (``data_batch_1..5``, ``test_batch``), given directly or as a sub-folder of ``root``;
* the official ``.tar.gz`` archive, given directly or lying in ``root`` (read in memory, nothing extracted).

Pickles are read with :func:`kdlab.safe_pickle.safe_load`, which refuses anything but plain data and NumPy arrays.
Images are kept as uint8 N×3×32×32 tensors; augmentation and normalisation happen batched on the training device.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageAugment
from kdlab.data.base import DATASETS, Dataset, Split
from kdlab.errors import DataError
from kdlab.safe_pickle import safe_load

if TYPE_CHECKING:
    from kdlab.config import DataConfig


@dataclass(frozen=True)
class CifarSpec:
    name: str
    num_classes: int
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_keys: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR100 = CifarSpec(
    "cifar100", 100, "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",),
    ("fine_labels", "labels"), CIFAR100_MEAN, CIFAR100_STD,
)  # fmt: skip
CIFAR10 = CifarSpec(
    "cifar10", 10, "cifar-10-batches-py", "cifar-10-python.tar.gz",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), ("labels", "fine_labels"), CIFAR10_MEAN, CIFAR10_STD,
)  # fmt: skip


def _key(d: dict, *names: str) -> Any:
    for name in names:
        for k in (name, name.encode()):
            if k in d:
                return d[k]
    raise DataError(f"CIFAR file has none of the keys {names}; found {sorted(map(str, d))[:6]}")


def _from_pickled_batch(d: Any, spec: CifarSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(d, dict):
        raise DataError(f"{source}: expected a dict, found {type(d).__name__}")
    data = np.asarray(_key(d, "data"), dtype=np.uint8)
    labels = np.asarray(_key(d, *spec.label_keys), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{source}: 'data' must be N×3072, found {data.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _from_npz(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            images = z["images"]
            label_key = next((k for k in spec.label_keys if k in z.files), None)
            if label_key is None:
                raise DataError(f"{path}: no label array ({' or '.join(spec.label_keys)})")
            labels = z[label_key].astype(np.int64)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: unreadable .npz ({type(err).__name__}: {err})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: 'images' must be uint8 N×32×32×3, found {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_folder(folder: Path, spec: CifarSpec, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{spec.name}: missing file {path}")
        with open(path, "rb") as f:
            parts.append(_from_pickled_batch(safe_load(f), spec, str(path)))
    return _concat(parts)


def _read_archive(path: Path, spec: CifarSpec) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{path}: not a readable tar archive ({err})") from None
    with tar:
        members = {m.name.split("/", 1)[-1] if "/" in m.name else m.name: m for m in tar.getmembers() if m.isfile()}

        def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
            parts = []
            for name in files:
                m = members.get(name)
                if m is None:
                    raise DataError(f"{path}: archive has no member '{spec.folder}/{name}'")
                f = tar.extractfile(m)
                assert f is not None
                parts.append(_from_pickled_batch(safe_load(f.read()), spec, f"{path}:{m.name}"))
            return _concat(parts)

        return read(spec.train_files), read(spec.test_files)


def read_cifar(root: str | Path, spec: CifarSpec) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return ``((x_train, y_train), (x_test, y_test))`` as uint8 N×3×32×32 and int64 arrays."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{spec.name}: data root not found: {root}")
    if root.is_file():
        return _read_archive(root, spec)
    if (root / "train.npz").is_file() and (root / "test.npz").is_file():
        return _from_npz(root / "train.npz", spec), _from_npz(root / "test.npz", spec)
    for folder in (root, root / spec.folder):
        if all((folder / f).is_file() for f in spec.train_files + spec.test_files):
            return _read_folder(folder, spec, spec.train_files), _read_folder(folder, spec, spec.test_files)
    if (root / spec.archive).is_file():
        return _read_archive(root / spec.archive, spec)
    raise DataError(
        f"{spec.name}: no data in {root} (expected train.npz+test.npz, a {spec.folder}/ folder or {spec.archive})"
    )


def load_cifar(root: str | Path | None, spec: CifarSpec, augment: bool = True) -> Dataset:
    if not root:
        raise DataError(f"{spec.name}: set data.root to the folder or archive holding the data")
    (x, y), (xt, yt) = read_cifar(root, spec)
    return Dataset(
        spec.name,
        Split(torch.from_numpy(x), torch.from_numpy(y)),
        Split(torch.from_numpy(xt), torch.from_numpy(yt)),
        spec.num_classes,
        ImageAugment(spec.mean, spec.std, num_samples=len(x), enabled=augment),
    )


@DATASETS.register("cifar100")
def _build_cifar100(cfg: DataConfig) -> Dataset:
    return load_cifar(cfg.root, CIFAR100, cfg.augment)


@DATASETS.register("cifar10")
def _build_cifar10(cfg: DataConfig) -> Dataset:
    return load_cifar(cfg.root, CIFAR10, cfg.augment)
