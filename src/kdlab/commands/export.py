"""``kdlab export-images``: write CIFAR-10/100 out as a folder of PNGs for ``data.name=imagefolder``."""

from __future__ import annotations

import argparse
import sys
import time

from kdlab.cli import command


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="CIFAR data: a train.npz/test.npz folder, a cifar-*-python folder or its .tar.gz")
    p.add_argument("--out", required=True, help="folder to create (train/<class>/*.png, val/<class>/*.png)")
    p.add_argument("--dataset", choices=("cifar100", "cifar10"), default="cifar100", help="default cifar100")
    p.add_argument("--limit", type=int, help="only the first N images of each split")


@command("export-images", "write CIFAR-10/100 as a folder of PNGs (train/<class>/, val/<class>/)", _args)
def export(args: argparse.Namespace) -> int:
    from kdlab.data.cifar import CIFAR10, CIFAR100, read_cifar
    from kdlab.data.export import export_images
    from kdlab.errors import KdlabError, check_output_folder

    if args.limit is not None and args.limit < 1:
        raise KdlabError("--limit must be positive")
    check_output_folder(args.out)  # before the data is read, not after
    spec = {"cifar100": CIFAR100, "cifar10": CIFAR10}[args.dataset]
    t0 = time.perf_counter()
    train, test = read_cifar(args.root, spec)
    counts = export_images({"train": train, "val": test}, args.out, limit=args.limit,
                           progress=lambda s, n: print(f"{s}: {n} images", file=sys.stderr))  # fmt: skip
    print(f"wrote {args.out}: {counts['train']} train / {counts['val']} val PNGs in {time.perf_counter() - t0:.1f} s")
    return 0
