"""``kdlab bench``: throughput of the reference loop vs kdlab live / cached / student alone (see :mod:`kdlab.bench`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdlab.cli import command, nonnegative_int, positive_int


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=("kd", "data"), default="kd",
                   help="kd: the distillation loop (default); data: ImageNet input pipelines, images/s of a "
                   "torchvision-style reference vs kdlab's image-folder and WebDataset paths (kdlab.benchdata)")  # fmt: skip
    p.add_argument("--root", help="data suite: an image folder whose training JPEGs to time (default: generated "
                   "photo-like 500×375 JPEGs)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--teacher", help="teacher architecture (default: resnet20 on CPU, resnet32x4 on CUDA)")
    p.add_argument("--student", help="student architecture (default: resnet8 on CPU, resnet8x4 on CUDA)")
    p.add_argument("--images", type=positive_int, help="images per timed epoch (default: 1024 on CPU, 20000 on CUDA; "
                   "data suite: 500)")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=64, help="batch size of every mode (default: 64)")
    p.add_argument("--compile", action="store_true", help="torch.compile kdlab's student step and teacher")
    p.add_argument("--workers", type=nonnegative_int, default=2,
                   help="DataLoader workers of the reference loop (default: 2, mdistiller's)")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="interleaved timed epochs per mode, the best kept (default: 5)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast row")
    p.add_argument("--json", help="also write the measurements to this JSON file")


@command("bench", "images/s: reference KD loop vs kdlab live teacher, teacher cache and student alone", _args)
def bench(args: argparse.Namespace) -> int:
    from kdlab.bench import format_report, run_bench
    from kdlab.engine.atomic import atomic_write_text
    from kdlab.errors import KdlabError, check_output_file

    if (args.images is not None and args.images < args.batch_size) or args.batch_size < 1:
        raise KdlabError("--images must be at least --batch-size, and --batch-size positive")
    if args.json:  # before minutes of benchmarking, not after (an existing file is replaced: it is a results file)
        check_output_file(args.json, overwrite=True, flag="--json")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.suite == "data":
        from kdlab.benchdata import format_data_report, run_data_bench

        if args.root and not (Path(args.root) / "train").is_dir():
            raise KdlabError(f"--root {args.root} is not an image folder (expected train/<class>/…)")
        res = run_data_bench(args.root, args.workers, args.images or 500, args.rounds, args.batch_size, log=log)
        print(format_data_report(res))
    else:
        res = run_bench(args.teacher, args.student, args.device, args.images, args.batch_size, args.compile,
                        args.workers, args.rounds, not args.no_bf16, log=log)  # fmt: skip
        print(format_report(res))
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=1), output=True)
    return 0
