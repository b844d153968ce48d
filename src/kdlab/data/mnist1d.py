"""MNIST-1D (Greydanus & Kobak): 10-class 1-D signals of length 40, generated locally by the ``mnist1d`` package.

The default (5,000 samples, 80/20 split) gives the standard 4,000 train / 1,000 test sets. The generated arrays are
cached on disk as ``.npz`` (no pickles) and standardised with the training set's mean and standard deviation.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kdlab.data.augment import VectorTransform
from kdlab.data.base import DATASETS, Dataset, Split
from kdlab.errors import DataError, KdlabError
from kdlab.fileio import open_binary

if TYPE_CHECKING:
    from kdlab.config import DataConfig

MNIST1D_SEED = 42  # the package's default data seed: the standard MNIST-1D


def default_cache_dir() -> Path:
    return Path(os.environ.get("KDLAB_CACHE", Path.home() / ".cache" / "kdlab"))


def generate_mnist1d(num_samples: int = 5000, train_split: float = 0.8) -> dict[str, np.ndarray]:
    """Generate MNIST-1D with the ``mnist1d`` package, leaving the global random states untouched."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = train_split
    args.seed = MNIST1D_SEED
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {"x": d["x"], "y": d["y"], "x_test": d["x_test"], "y_test": d["y_test"]}


def load_mnist1d(
    num_samples: int = 5000, train_split: float = 0.8, root: str | Path | None = None, shift: int = 0
) -> Dataset:
    """Load (generating and caching on first use) the standardised MNIST-1D dataset.

    ``shift`` > 0 enables random-translation augmentation of training batches (see :class:`VectorTransform`).
    """
    root = Path(root) if root else default_cache_dir()
    path = root / f"mnist1d_n{num_samples}_split{train_split:g}_seed{MNIST1D_SEED}.npz"
    arrays = None
    if path.is_file():
        try:  # read through kdlab.fileio: a regular file within KDLAB_MAX_BYTES_ARCHIVE
            with open_binary(path, "archive", "MNIST-1D cache", DataError) as f, np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:  # a damaged (or oversized) cache is regenerated, never trusted
            arrays = None
    if arrays is None:
        if num_samples < 20:  # the generator makes num_samples // 10 samples per class
            raise DataError(f"MNIST-1D needs data.num_samples >= 20 (two per class), got {num_samples}")
        arrays = generate_mnist1d(num_samples, train_split)
        try:
            root.mkdir(parents=True, exist_ok=True)
            from kdlab.engine.atomic import atomic_write_bytes  # lazily: kdlab.engine imports kdlab.data

            buf = io.BytesIO()
            np.savez(buf, **arrays)
            atomic_write_bytes(path, buf.getvalue(), output=True)  # also removes killed writers' temporaries
        except (OSError, KdlabError):
            pass  # caching is an optimisation; an unwritable cache folder is not an error
    x = torch.from_numpy(arrays["x"].astype(np.float32))
    x_test = torch.from_numpy(arrays["x_test"].astype(np.float32))
    if len(x) < 2 or len(x_test) == 0:  # one training sample has no standard deviation
        raise DataError(f"MNIST-1D with num_samples={num_samples}, train_split={train_split} has too few samples "
                        f"({len(x)} train, {len(x_test)} test; need at least 2 and 1)")  # fmt: skip
    mean, std = x.mean(), x.std()
    x, x_test = (x - mean) / std, (x_test - mean) / std
    y = torch.from_numpy(arrays["y"].astype(np.int64))
    y_test = torch.from_numpy(arrays["y_test"].astype(np.int64))
    return Dataset("mnist1d", Split(x, y), Split(x_test, y_test), 10, VectorTransform(shift, len(x)))


@DATASETS.register("mnist1d")
def _build(cfg: DataConfig) -> Dataset:
    return load_mnist1d(cfg.num_samples, cfg.train_split, cfg.root, cfg.shift if cfg.augment else 0)
