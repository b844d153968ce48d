"""``kdlab export-images``: write CIFAR-10/100 or an image folder out for streaming (a PNG folder or WebDataset
shards)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kdlab.cli import command

FORMATS = ("folder", "webdataset")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="CIFAR data (a train.npz/test.npz folder, a cifar-*-python folder or its .tar.gz), or "
                   "an image folder with train/<class>/… and val/<class>/… (webdataset only)")  # fmt: skip
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--format", choices=FORMATS, default="folder",
                   help="folder: train/<class>/*.png, val/<class>/*.png (CIFAR); webdataset: train-*.tar, val-*.tar "
                   "and dataset.json (default folder)")  # fmt: skip
    p.add_argument("--shard-size", type=int, default=5000, help="webdataset: samples per shard (default 5000)")
    p.add_argument("--dataset", choices=("cifar100", "cifar10"), default="cifar100", help="CIFAR: default cifar100")
    p.add_argument("--limit", type=int, help="only N images of each split (training: a seeded random subset for "
                   "webdataset, the first N for folder)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="webdataset: seed of the training samples' order (default 0)")


def _is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and ((root / "val").is_dir() or (root / "test").is_dir())


@command("export-images", "write CIFAR or an image folder as PNG folders or WebDataset shards", _args)
def export(args: argparse.Namespace) -> int:
    from kdlab.data.cifar import CIFAR10, CIFAR100, read_cifar
    from kdlab.data.export import array_source, export_images, export_webdataset, folder_sources
    from kdlab.errors import KdlabError, check_output_folder

    if args.limit is not None and args.limit < 1:
        raise KdlabError("--limit must be positive")
    if args.shard_size < 1:
        raise KdlabError("--shard-size must be at least 1")
    out = check_output_folder(args.out)  # before anything is read: an existing export is never touched
    root = Path(args.root)
    t0 = time.perf_counter()
    say = lambda s, n: print(f"{s}: {n} images", file=sys.stderr)  # noqa: E731
    if _is_image_folder(root):
        if args.format != "webdataset":
            raise KdlabError(f"{root} is an image folder already; --format webdataset writes it as shards")
        classes, sources = folder_sources(root)
        counts = export_webdataset(sources, classes, out, shard_size=args.shard_size, limit=args.limit,
                                   seed=args.seed, progress=say, source_name=str(root))  # fmt: skip
    else:
        spec = {"cifar100": CIFAR100, "cifar10": CIFAR10}[args.dataset]
        train, test = read_cifar(args.root, spec)
        if args.format == "folder":
            counts = export_images({"train": train, "val": test}, out, limit=args.limit, progress=say)
        else:
            width = max(len(str(spec.num_classes - 1)), 3)
            classes = [f"{c:0{width}d}" for c in range(spec.num_classes)]  # the folder export's class names
            counts = export_webdataset({"train": array_source(*train), "val": array_source(*test)}, classes, out,
                                       shard_size=args.shard_size, transform="cifar", limit=args.limit,
                                       seed=args.seed, progress=say, source_name=spec.name)  # fmt: skip
    what = "PNGs" if args.format == "folder" else "samples in WebDataset shards"
    print(f"wrote {out}: {counts['train']} train / {counts['val']} val {what} in {time.perf_counter() - t0:.1f} s")
    return 0
