"""Write a dataset out for streaming: an image folder (PNGs) or WebDataset shards.

* :func:`export_images` — CIFAR-10/100 as ``train/<class>/…`` and ``val/<class>/…`` PNGs. Class folders are the
  zero-padded label (``000``, ``001``, …), so sorted folder names give back the original label indices, and
  ``data.name=imagefolder`` on the result sees the same classes (``data.transform=cifar`` for the 32-px pipeline).
  Files are lossless PNG, named by the sample's index in its split.
* :func:`export_webdataset` — CIFAR or any image folder (class index = sorted folder names, as
  ``data.name=imagefolder`` reads it) as ``train-NNNNNN.tar`` / ``val-NNNNNN.tar`` shards of ``shard_size``
  samples and ``dataset.json`` (the format is described in :mod:`kdlab.data.webdataset`). Folder images are copied
  byte for byte (no re-encoding); CIFAR images become lossless PNGs. Training samples are written in a seeded random
  order, so that every shard — and every shuffle buffer reading it — mixes the classes; validation samples keep the
  folder's order.

The output is written next to ``out`` under a temporary name and renamed into place at the end: an interrupted export
leaves no half-written folder, and an existing non-empty ``out`` is never touched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from kdlab.data.decode import pil_image
from kdlab.errors import DataError, KdlabError

Progress = Callable[[str, int], None]


def _prepare_out(out: Path) -> Path:
    """A fresh temporary folder next to ``out`` (which must not exist or be an empty folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not empty; choose another --out")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish_out(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)


def _class_width(labels: np.ndarray) -> int:
    return max(len(str(max(int(labels.max()), 1))), 3)


def export_images(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    out: str | Path,
    *,
    limit: int | None = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Write uint8 N×3×H×W images with int labels per split (``train``, ``val``) as PNGs; returns images per split.

    ``limit`` keeps the first ``limit`` samples of each split. ``out`` must not exist or be an empty folder.
    """
    image_mod = pil_image()
    out = Path(out)
    tmp = _prepare_out(out)
    counts: dict[str, int] = {}
    try:
        for split, (x, y) in splits.items():
            n = len(x) if limit is None else min(limit, len(x))
            width = _class_width(y)
            for label in np.unique(y[:n]):
                (tmp / split / f"{int(label):0{width}d}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = image_mod.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0)))
                img.save(tmp / split / f"{int(y[i]):0{width}d}" / f"{i:05d}.png", compress_level=1)
                if progress and (i + 1) % 10000 == 0:
                    progress(split, i + 1)
            counts[split] = n
        _finish_out(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset shards


class SampleSource:
    """Samples of one split to export: ``count`` of them, read by position as ``(image bytes, suffix, label)``."""

    def __init__(self, count: int, labels: np.ndarray, read: Callable[[int], tuple[bytes, str]]) -> None:
        self.count, self.labels, self._read = count, labels, read

    def read(self, i: int) -> tuple[bytes, str, int]:
        data, suffix = self._read(i)
        return data, suffix, int(self.labels[i])


def array_source(x: np.ndarray, y: np.ndarray) -> SampleSource:
    """uint8 N×3×H×W images (CIFAR) as lossless PNGs."""
    image_mod = pil_image()

    def read(i: int) -> tuple[bytes, str]:
        buf = io.BytesIO()
        image_mod.fromarray(np.ascontiguousarray(x[i].transpose(1, 2, 0))).save(buf, "PNG", compress_level=1)
        return buf.getvalue(), "png"

    return SampleSource(len(x), np.asarray(y, dtype=np.int64), read)


def folder_sources(root: Path) -> tuple[list[str], dict[str, SampleSource]]:
    """The class names and the train / val samples of an image folder, scanned as ``data.name=imagefolder`` does
    (symlink loops followed once, non-regular files refused); files are read through :mod:`kdlab.fileio`."""
    from kdlab.data.folder import class_folders, eval_dir, scan_split
    from kdlab.fileio import read_bytes

    classes = class_folders(root / "train")
    out: dict[str, SampleSource] = {}
    for split, folder in (("train", root / "train"), ("val", eval_dir(root))):
        paths, labels = scan_split(folder, classes)

        def read(i: int, paths=paths) -> tuple[bytes, str]:  # noqa: ANN001 (bound per split)
            path = paths[i]
            return read_bytes(path, "image", what="image", error=DataError), path.rsplit(".", 1)[-1].lower()

        out[split] = SampleSource(len(paths), labels, read)
    return classes, out


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _shard_order(n: int, shuffle: bool, seed: int) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(n)


def _chunks(order: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def export_webdataset(
    sources: dict[str, SampleSource],
    classes: list[str],
    out: str | Path,
    *,
    shard_size: int = 5000,
    transform: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    source_name: str = "",
) -> dict[str, int]:
    """Write ``train`` and ``val`` as WebDataset shards plus ``dataset.json``; returns samples per split.

    ``limit`` keeps ``limit`` samples per split (training: the first of the shuffled order, a random subset)."""
    from kdlab.data.webdataset import FORMAT, HEADER, META_FILE

    if shard_size < 1:
        raise KdlabError("--shard-size must be at least 1")
    out = Path(out)
    tmp = _prepare_out(out)
    export_id = uuid.uuid4().hex
    meta: dict = {"format": FORMAT, "export_id": export_id, "num_classes": len(classes), "classes": classes,
                  "transform": transform, "source": source_name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "splits": {}}  # fmt: skip
    counts: dict[str, int] = {}
    try:
        for split in ("train", "val"):
            src = sources[split]
            order = _shard_order(src.count, split == "train", seed)[:limit]
            width = max(6, len(str(max(len(order) - 1, 0))))
            shards, done = [], 0
            for k, chunk in enumerate(_chunks(order, shard_size)):
                name = f"{split}-{k:06d}.tar"
                labels = []
                with tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT) as tar:
                    head = {"format": FORMAT, "export_id": export_id, "split": split, "shard": k,
                            "count": len(chunk), "num_classes": len(classes)}  # fmt: skip
                    _tar_member(tar, HEADER, json.dumps(head).encode())
                    for i in chunk.tolist():
                        data, suffix, label = src.read(i)
                        key = f"{done:0{width}d}"
                        _tar_member(tar, f"{key}.{suffix}", data)
                        _tar_member(tar, f"{key}.cls", str(label).encode())
                        labels.append(label)
                        done += 1
                        if progress and done % 10000 == 0:
                            progress(split, done)
                shards.append({"name": name, "count": len(chunk), "labels": labels})
            if not shards:
                raise DataError(f"export: the {split} split has no samples")
            meta["splits"][split] = {"count": done, "shards": shards}
            counts[split] = done
        compact = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in meta.items())
        (tmp / META_FILE).write_text("{\n" + compact + "\n}\n")  # a line per key, the label lists compact
        _finish_out(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
