"""Write a resident image dataset (CIFAR-10/100) out as an image folder: ``train/<class>/…`` and ``val/<class>/…``.

Class folders are the zero-padded label (``000``, ``001``, …), so sorted folder names give back the original label
indices, and ``data.name=imagefolder`` on the result sees the same classes (``data.transform=cifar`` for the 32-px
pipeline). Files are lossless PNG, named by the sample's index in its split. The folder is written next to ``out``
under a temporary name and renamed into place at the end: an interrupted export leaves no half-written folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kdlab.data.images import pil_image
from kdlab.errors import DataError


def export_images(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    out: str | Path,
    *,
    limit: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, int]:
    """Write uint8 N×3×H×W images with int labels per split (``train``, ``val``) as PNGs; returns images per split.

    ``limit`` keeps the first ``limit`` samples of each split. ``out`` must not exist or be an empty folder.
    """
    image_mod = pil_image()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    try:
        for split, (x, y) in splits.items():
            n = len(x) if limit is None else min(limit, len(x))
            width = len(str(max(int(y.max()), 1)))
            width = max(width, 3)
            for label in np.unique(y[:n]):
                (tmp / split / f"{int(label):0{width}d}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = image_mod.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0)))
                img.save(tmp / split / f"{int(y[i]):0{width}d}" / f"{i:05d}.png", compress_level=1)
                if progress and (i + 1) % 10000 == 0:
                    progress(split, i + 1)
            counts[split] = n
        if out.exists():
            out.rmdir()
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
