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

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, ImageAugment
from kdlab.data.base import DATASETS, Dataset, Split
from kdlab.errors import DataError
from kdlab.fileio import open_binary
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


MAX_MEMBER_BYTES = 1 << 30  # one archive / .npz member; CIFAR's largest (cifar-100 train) is 155 MB


def _array(value: Any, what: str, source: str) -> np.ndarray:
    """``value`` as a numeric array; ragged or non-numeric data is a one-line error naming ``source``."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise DataError(f"{source}: '{what}' is not a rectangular array ({err})") from None
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{source}: '{what}' must be numeric, found {arr.dtype} values")
    return arr


def _images(value: Any, source: str, what: str = "images") -> np.ndarray:
    """Images must be uint8 (0..255): float images would silently turn black when cast."""
    arr = _array(value, what, source)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        hint = " (convert with (x * 255).round().astype(np.uint8))" if arr.dtype.kind == "f" else ""
        raise DataError(f"{source}: '{what}' must be uint8 values 0..255, found {arr.dtype}{hint}")
    return arr.astype(np.uint8)


def _labels(value: Any, n: int, source: str) -> np.ndarray:
    """Whole-number labels, one per image (NaN, fractions and a count mismatch are errors naming ``source``)."""
    arr = _array(value, "labels", source)
    if arr.ndim != 1:
        raise DataError(f"{source}: labels must be a 1-D array, found shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{source}: labels contain NaN or infinite values")
        if (arr != np.round(arr)).any():
            raise DataError(f"{source}: labels must be whole numbers, found {arr[arr != np.round(arr)][0]}")
    if len(arr) != n:
        raise DataError(f"{source}: {n} images but {len(arr)} labels")
    return arr.astype(np.int64)


def _from_pickled_batch(d: Any, spec: CifarSpec, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(d, dict):
        raise DataError(f"{source}: expected a dict, found {type(d).__name__}")
    data = _images(_key(d, "data"), source, "data")
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{source}: 'data' must be N×3072, found {data.shape}")
    return data.reshape(-1, 3, 32, 32), _labels(_key(d, *spec.label_keys), len(data), source)


def _check_npz_sizes(z: Any, path: Path) -> None:
    """Refuse an oversized (or zip-bomb) member from its header, before reading it."""
    for info in z.zip.infolist():
        if info.file_size > MAX_MEMBER_BYTES:
            raise DataError(f"{path}: member '{info.filename}' is {info.file_size} bytes, over the "
                            f"{MAX_MEMBER_BYTES} byte limit")  # fmt: skip


def _from_npz(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open_binary(path, "archive", "data file", DataError) as f, np.load(f, allow_pickle=False) as z:
            if not hasattr(z, "zip"):
                raise DataError(f"{path}: not an .npz archive of arrays")
            _check_npz_sizes(z, path)
            if "images" not in z.files:
                raise DataError(f"{path}: no 'images' array; found {sorted(z.files)[:6]}")
            images = z["images"]
            label_key = next((k for k in spec.label_keys if k in z.files), None)
            if label_key is None:
                raise DataError(f"{path}: no label array ({' or '.join(spec.label_keys)})")
            raw_labels = z[label_key]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: unreadable .npz ({type(err).__name__}: {err})") from None
    if images.dtype.kind == "f":
        images = _images(images, str(path))  # the uint8 error with its conversion hint
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: 'images' must be uint8 N×32×32×3, found {images.dtype} {images.shape}")
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), _labels(raw_labels, len(images), str(path))


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _read_folder(folder: Path, spec: CifarSpec, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for name in files:
        path = folder / name
        if not os.path.lexists(path):
            raise DataError(f"{spec.name}: missing file {path}")
        if path.is_file() and path.stat().st_size > MAX_MEMBER_BYTES:
            raise DataError(f"{path} is {path.stat().st_size} bytes, over the {MAX_MEMBER_BYTES} byte limit")
        with open_binary(path, "archive", f"{spec.name}: data file", DataError) as f:  # a FIFO or device: named
            try:
                d = safe_load(f)
            except DataError as err:
                raise type(err)(f"{path}: {err}") from None
            parts.append(_from_pickled_batch(d, spec, str(path)))
    return _concat(parts)


def _read_archive(
    path: Path, spec: CifarSpec, what: str = "data archive"
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    f = open_binary(path, "archive", f"{spec.name}: {what}", DataError)  # a FIFO or device: named
    try:
        tar = tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.TarError, OSError) as err:
        f.close()
        raise DataError(f"{path}: not a readable tar archive ({err})") from None
    with f, tar:
        members = {m.name.split("/", 1)[-1] if "/" in m.name else m.name: m for m in tar.getmembers() if m.isfile()}

        def read(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
            parts = []
            for name in files:
                m = members.get(name)
                if m is None:
                    raise DataError(f"{path}: archive has no member '{spec.folder}/{name}'")
                if m.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: member '{m.name}' is {m.size} bytes, over the {MAX_MEMBER_BYTES} byte limit")
                f = tar.extractfile(m)
                assert f is not None
                try:
                    d = safe_load(f.read())
                except DataError as err:
                    raise type(err)(f"{path}:{m.name}: {err}") from None
                parts.append(_from_pickled_batch(d, spec, f"{path}:{m.name}"))
            return _concat(parts)

        return read(spec.train_files), read(spec.test_files)


def read_cifar(root: str | Path, spec: CifarSpec) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return ``((x_train, y_train), (x_test, y_test))`` as uint8 N×3×32×32 and int64 arrays."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{spec.name}: data root not found: {root}")
    if not root.is_dir():
        return _read_archive(root, spec, "data root")  # a FIFO or device is named, never read
    # a layout is recognised by its names (whatever they are: a FIFO or a device is then named by the reader)
    if os.path.lexists(root / "train.npz") and os.path.lexists(root / "test.npz"):
        return _from_npz(root / "train.npz", spec), _from_npz(root / "test.npz", spec)
    for folder in (root, root / spec.folder):
        if all(os.path.lexists(folder / f) for f in spec.train_files + spec.test_files):
            return _read_folder(folder, spec, spec.train_files), _read_folder(folder, spec, spec.test_files)
    if os.path.lexists(root / spec.archive):
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
