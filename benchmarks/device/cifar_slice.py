"""A CIFAR-100 slice small enough to travel to the device machine, and its decoding there.

CIFAR-100 is 150 MB of raw pixels and the device call carries at most 64 MiB, so the slice keeps the first ``train``
training images and the first ``test`` test images (the official order) and stores them losslessly as WebP mosaics
(100 images a row, at most 5,000 a mosaic): 0.56 of the raw bytes against 0.91 for ``np.savez_compressed`` and 0.67
for xz with a delta filter, measured on the first 5,000 training images. The first 20,000 training images and the
10,000 test images come to about 52 MB.

``write`` (here) -> ``SLICE/manifest.json`` + ``{train,test}-N.webp`` + ``{train,test}-labels.npy`` (int16);
``decode`` (there) -> ``OUT/train.npz`` and ``OUT/test.npz`` in the layout ``data.name=cifar100`` reads, after
checking the SHA-256 of every decoded array against the manifest.

Usage: ``python cifar_slice.py write SRC_DIR SLICE_DIR [--train N] [--test N]`` and
``python cifar_slice.py decode SLICE_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

PER_ROW = 100  # images per mosaic row
PER_MOSAIC = 5000  # images per mosaic: 1600 × 3200 pixels (WebP's limit is 16383 a side)
FORMAT = 1
MAX_MANIFEST_BYTES = 1 << 20


class SliceError(Exception):
    """A slice that cannot be written or does not decode to what its manifest says."""


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _mosaic(images: np.ndarray) -> np.ndarray:
    """N×32×32×3 uint8 -> one (rows·32)×(100·32)×3 image, the last row padded with black."""
    rows = -(-len(images) // PER_ROW)
    padded = np.zeros((rows * PER_ROW, 32, 32, 3), np.uint8)
    padded[: len(images)] = images
    return padded.reshape(rows, PER_ROW, 32, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * 32, PER_ROW * 32, 3)


def _unmosaic(pixels: np.ndarray, count: int) -> np.ndarray:
    h, w, c = pixels.shape
    if w != PER_ROW * 32 or h % 32 or c != 3 or h // 32 * PER_ROW < count:
        raise SliceError(f"a mosaic of {h}×{w}×{c} cannot hold {count} CIFAR images")
    rows = h // 32
    return pixels.reshape(rows, 32, PER_ROW, 32, 3).transpose(0, 2, 1, 3, 4).reshape(rows * PER_ROW, 32, 32, 3)[:count]


def write(src: Path, out: Path, train: int, test: int, effort: int = 4) -> dict:
    """Write the first ``train`` / ``test`` images of the CIFAR-100 folder ``src`` (train.npz, test.npz) to ``out``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.webp"), *out.glob("*-labels.npy"), out / "manifest.json"]:
        old.unlink(missing_ok=True)
    manifest: dict = {"format": FORMAT, "source": str(src), "splits": {}}
    for split, count in (("train", train), ("test", test)):
        with np.load(src / f"{split}.npz", allow_pickle=False) as z:
            images, labels = z["images"], z["fine_labels"]
        if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3):
            raise SliceError(f"{src / f'{split}.npz'}: images must be uint8 N×32×32×3, found {images.dtype} {images.shape}")
        if not 0 < count <= len(images):
            raise SliceError(f"{split}: asked for {count} images, {src / f'{split}.npz'} holds {len(images)}")
        images, labels = images[:count], labels[:count].astype(np.int16)
        files = []
        for i, start in enumerate(range(0, count, PER_MOSAIC)):
            name = f"{split}-{i}.webp"
            Image.fromarray(_mosaic(images[start : start + PER_MOSAIC])).save(
                out / name, "WEBP", lossless=True, quality=100, method=effort
            )
            files.append({"file": name, "count": len(images[start : start + PER_MOSAIC])})
        np.save(out / f"{split}-labels.npy", labels, allow_pickle=False)
        manifest["splits"][split] = {
            "count": count, "mosaics": files, "labels": f"{split}-labels.npy",
            "images_sha256": _sha256(images), "labels_sha256": _sha256(labels),
        }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def decode(slice_dir: Path, out: Path) -> dict[str, int]:
    """Decode ``slice_dir`` into ``out/train.npz`` and ``out/test.npz``; returns the image count per split."""
    from PIL import Image, features

    path = slice_dir / "manifest.json"
    if not path.is_file() or path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SliceError(f"{path}: no slice manifest (run benchmarks/device/prepare.sh)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise SliceError(f"{path}: format {manifest.get('format')!r}, this decoder reads {FORMAT}")
    if not features.check("webp"):
        raise SliceError("this Pillow cannot decode WebP")
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rec in manifest["splits"].items():
        parts = []
        for m in rec["mosaics"]:
            with Image.open(slice_dir / m["file"]) as im:
                parts.append(_unmosaic(np.asarray(im.convert("RGB")), int(m["count"])))
        images = np.concatenate(parts)
        labels = np.load(slice_dir / rec["labels"], allow_pickle=False)
        if len(images) != rec["count"] or _sha256(images) != rec["images_sha256"]:
            raise SliceError(f"{slice_dir}: the {split} images do not decode to the manifest's SHA-256")
        if _sha256(labels) != rec["labels_sha256"]:
            raise SliceError(f"{slice_dir}: the {split} labels differ from the manifest's SHA-256")
        np.savez(out / f"{split}.npz", images=images, fine_labels=labels)
        counts[split] = len(images)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a slice of a CIFAR-100 folder (train.npz, test.npz)")
    w.add_argument("src", type=Path)
    w.add_argument("out", type=Path)
    w.add_argument("--train", type=int, default=20000, help="first N training images (default 20000)")
    w.add_argument("--test", type=int, default=10000, help="first N test images (default 10000, all)")
    d = sub.add_parser("decode", help="decode a slice into train.npz / test.npz")
    d.add_argument("slice", type=Path)
    d.add_argument("out", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "write":
            m = write(args.src, args.out, args.train, args.test)
            size = sum(f.stat().st_size for f in args.out.iterdir())
            print(f"cifar slice: {m['splits']['train']['count']} train + {m['splits']['test']['count']} test images, "
                  f"{size / 2**20:.1f} MiB in {args.out}")  # fmt: skip
        else:
            counts = decode(args.slice, args.out)
            print(f"cifar slice: {counts.get('train', 0)} train + {counts.get('test', 0)} test images -> {args.out}")
    except (SliceError, OSError, KeyError, ValueError) as err:
        print(f"cifar_slice: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
