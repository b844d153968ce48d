"""``kdlab cache-teacher``: precompute teacher outputs for V augmented views (see :mod:`kdlab.engine.teacher_cache`)."""

from __future__ import annotations

import argparse
import sys
import time

from kdlab.cli import command, positive_int
from kdlab.errors import KdlabError, check_output_file
from kdlab.launch.options import add_launcher_argument, launcher_overrides


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a distillation recipe (its data and teacher sections are used)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--views", type=positive_int, required=True, help="augmented views per training sample (= epochs for exact replay)")
    p.add_argument("--out", required=True, help="cache file to write (.safetensors)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage precision (default float16)")
    p.add_argument("--fields", help="comma-separated subset of logits,pooled,prepool (default: what the recipe's method reads)")
    p.add_argument("--batch-size", type=positive_int, default=512, help="teacher batch size (default 512)")
    p.add_argument("--store", default="auto", help="logits store: full | topk (top-k fp16 + the rest quantised; "
                   "for ImageNet-size class counts) | auto (default: topk above 200 classes)")  # fmt: skip
    p.add_argument("--topk", type=positive_int, help="topk store: logits kept exactly (default 10)")
    p.add_argument("--tail-bits", type=int, help="topk store: 8 or 4 bits per quantised logit, 0 = one constant per "
                   "sample (default 8)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache file")
    add_launcher_argument(p)


@command("cache-teacher", "precompute teacher outputs for V augmented views, replayed with teacher.cache=FILE", _args)
def cache_teacher(args: argparse.Namespace) -> int:
    import torch

    from kdlab.config import load_config
    from kdlab.data import build_dataset
    from kdlab.engine.fastpath import FastPath
    from kdlab.engine.objective import select_device
    from kdlab.engine.teacher_cache import build_cache, check_store
    from kdlab.engine.teachers import load_teacher, teacher_fingerprint

    out = check_output_file(args.out, args.overwrite)  # before any view is computed
    if args.views < 1 or args.batch_size < 1:
        raise KdlabError("--views and --batch-size must be positive")
    sizes = {k: v for k, v in (("topk", args.topk), ("tail_bits", args.tail_bits)) if v is not None}
    check_store(args.store, **sizes)  # before anything is loaded
    cfg = load_config(args.config, [*args.overrides, *launcher_overrides(args)])
    if cfg.teacher is None:
        raise KdlabError(f"{args.config} has no teacher section")
    from kdlab.engine.teacher_cache import cache_refusal
    from kdlab.methods import build_method

    method = build_method(cfg.method.name, cfg.method.params())
    if method.teacher_bn == "train":  # the recipe's runs could not replay the cache (batch statistics)
        raise KdlabError(cache_refusal(cfg.method.name, method) or "")
    if cfg.launcher.name != "local":
        return _submit(args, cfg)
    device = select_device(cfg.train.device)
    data = build_dataset(cfg.data).to(device)
    teacher = load_teacher(cfg.teacher, data.num_classes).to(device)
    if args.fields:
        fields = tuple(f.strip() for f in args.fields.split(","))
    else:
        from kdlab.methods import METHODS

        fields = METHODS.get(cfg.method.name).teacher_outputs or ("logits",)
    seed = cfg.seed if cfg.data.augment_seed is None else cfg.data.augment_seed
    t0 = time.perf_counter()
    meta = {"teacher": cfg.teacher.name, "teacher_sha256": teacher_fingerprint(cfg.teacher),
            "data": cfg.data.model_dump(mode="json")}  # fmt: skip
    fast = FastPath(cfg.train, device, data.example_batch(2))  # the run's autocast / memory format / compile
    build_cache(
        teacher, data, args.views, out, augment_seed=seed, fields=fields,
        dtype=getattr(torch, args.dtype), batch_size=args.batch_size, meta=meta,
        progress=lambda v, n: print(f"view {v}/{n} ({time.perf_counter() - t0:.1f}s)", file=sys.stderr),
        store=args.store, fast=fast, fold_bn=cfg.teacher.fold_bn, **sizes,
    )  # fmt: skip
    size = out.stat().st_size / 2**20
    from kdlab.engine.teacher_cache import TeacherCache

    info = TeacherCache(out).info.meta
    store = f"top-{info['topk']} + {info['tail_bits']}-bit rest" if info["store"] == "topk" else f"full {args.dtype}"
    print(f"wrote {out}: {args.views} views × {data.num_train} samples, {size:.1f} MiB ({store}), augment seed {seed}")
    return 0


def _submit(args: argparse.Namespace, cfg) -> int:
    """``--launcher slurm``: the same command as one job (run there with the local launcher)."""
    from pathlib import Path

    from kdlab.launch import LAUNCH_DIR, kdlab_argv
    from kdlab.pipelines.runner import submit_command

    out = Path(args.out).absolute()
    argv = ["cache-teacher", str(Path(args.config).absolute()), *args.overrides, "launcher.name=local",
            "--views", str(args.views), "--out", str(out), "--dtype", args.dtype, "--batch-size", str(args.batch_size),
            "--store", args.store]  # fmt: skip
    for flag, value in (("--fields", args.fields), ("--topk", args.topk), ("--tail-bits", args.tail_bits)):
        if value is not None:
            argv += [flag, str(value)]
    if args.overwrite:
        argv.append("--overwrite")
    folder = out.parent / LAUNCH_DIR
    name = out.name.replace(" ", "_")
    job = submit_command(cfg.launcher, name, kdlab_argv(*argv), folder, folder / f"{name}.log", f"kdlab:{out.name}")
    print(f"submitted {out} as {cfg.launcher.name} job {job}; its log: {folder / (name + '.log')}")
    return 0
