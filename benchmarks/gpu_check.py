"""The GPU check of kdlab's fast path (run by ``benchmarks/gpu_check.sh``; about 8 minutes on one GPU).

1. Agreement: for every registered method, one training batch (resnet20 → resnet8, CIFAR-shaped synthetic data) on
   the device against the same batch on the CPU (float32, TF32 off): loss and every gradient.
2. Throughput: resnet32x4 → resnet8x4 at batch 64 / 256 / 512, live teacher / teacher cache / student alone,
   fp32 / bf16, compile off / on (images/s of a warm epoch).
3. A 5-epoch CIFAR-100 KD run (resnet32x4 → resnet8x4): its test accuracy. ``--data`` is a CIFAR-100 folder;
   synthetic CIFAR-shaped data when absent. ``--teacher`` is a resnet32x4 checkpoint (random weights when absent,
   which checks the pipeline, not the accuracy).

Prints one markdown table per part, and writes them to ``--out`` (default ``gpu_check.md``).
``--device cpu --quick`` runs a miniature of every part on the CPU (used by the tests).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from kdlab.config import load_config
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.methods import METHODS
from kdlab.models import build

PARAMS = {"crd": ["method.nce_k=64"]}  # a small training set cannot feed the default 16384 negatives


def _cfg(tmp: Path, student: str, teacher: str | None, n: int, batch: int, device: str, extra: list[str]):
    base = {
        "data": {"name": "synthetic", "num_samples": n + 64, "train_split": n / (n + 64), "num_classes": 100},
        "model": {"name": student},
        "method": {"name": "ce" if teacher is None else "kd"},
        "train": {"epochs": 5, "batch_size": batch, "progress": False, "device": device},
        "schedule": {"name": "constant"},
    }  # fmt: skip
    if teacher is not None:
        path = tmp / f"{teacher}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            ck.save_weights(path, build(teacher).state_dict())
        base["teacher"] = {"name": teacher, "checkpoint": str(path)}
    return load_config(None, extra, base=base)


def _one_step(tr: Trainer) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients (on the CPU) of the first training batch of epoch 1."""
    tr.objective.train()
    torch.manual_seed(0)
    x, y, idx = next(iter(tr.data.train_batches(tr.cfg.train.batch_size, seed=0, epoch=1, augment_seed=0,
                                                augment_epoch=1)))  # fmt: skip
    _, _, loss = tr.forward_losses(x, y, idx, 1)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = list(tr.student.parameters()) + list(tr.method.parameters())
    return float(loss), [p.grad.detach().float().cpu() for p in params if p.grad is not None]


def check_methods(device: str, tmp: Path, quick: bool, names: list[str] | None = None) -> list[dict]:
    """Loss and gradient agreement, device vs CPU, for every registered method (or ``names``)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    teacher, n, batch = ("resnet8", 64, 16) if quick else ("resnet20", 256, 64)
    rows = []
    for name in names or METHODS.names():
        extra = [f"method.name={name}", "train.amp=none", *PARAMS.get(name, [])]
        try:
            needs_teacher = METHODS.get(name).needs_teacher
            runs = []
            for dev in ("cpu", device):
                cfg = _cfg(tmp, "resnet8", teacher if needs_teacher else None, n, batch, dev, extra)
                runs.append(Trainer(cfg, tmp / f"m-{name}-{dev}-{len(runs)}"))
            runs[1].student.load_state_dict(runs[0].student.state_dict())
            runs[1].method.load_state_dict(runs[0].method.state_dict())
            (l0, g0), (l1, g1) = _one_step(runs[0]), _one_step(runs[1])
            grad_err = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(g0, g1)) if g0 else 0.0
            loss_err = abs(l0 - l1) / max(abs(l0), 1e-12)
            ok = len(g0) == len(g1) and loss_err < 1e-3 and grad_err < 1e-2 and math.isfinite(l1)
            rows.append({"method": name, "loss_cpu": l0, "loss_dev": l1, "loss_rel_err": loss_err,
                         "grad_rel_err": grad_err, "status": "ok" if ok else "DIFFERS"})  # fmt: skip
        except Exception as err:  # report every method, whatever fails
            rows.append({"method": name, "status": f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:80]}"})
            traceback.print_exc(file=sys.stderr)
    return rows


def _rate(tr: Trainer) -> float:
    dev = tr.device
    tr.train_epoch(1)  # warm-up: compile, cudnn autotuning, cache view load
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    tr.train_epoch(2)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return tr.data.num_train / (time.perf_counter() - t0)


def check_throughput(device: str, tmp: Path, quick: bool, compile_modes: list[bool]) -> list[dict]:
    from kdlab.engine.atomic import sha256_file
    from kdlab.engine.teacher_cache import build_cache

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    teacher, student = ("resnet8", "resnet8") if quick else ("resnet32x4", "resnet8x4")
    batches = [16] if quick else [64, 256, 512]
    rows = []
    for batch in batches:
        n = batch * (2 if quick else max(20, 10240 // batch))
        cache = tmp / f"cache-{batch}.safetensors"
        for amp in ("none", "bf16"):
            for comp in compile_modes:
                extra = [f"train.amp={amp}", f"train.compile={str(comp).lower()}"]
                for mode in ("live", "cached", "student"):
                    t0 = time.perf_counter()
                    try:
                        cfg = _cfg(tmp, student, None if mode == "student" else teacher, n, batch, device,
                                   extra + ([f"teacher.cache={cache}"] if mode == "cached" else []))  # fmt: skip
                        if mode == "cached" and not cache.exists():
                            src = Trainer(_cfg(tmp, student, teacher, n, batch, device, ["train.amp=none"]),
                                          tmp / f"src-{batch}")  # fmt: skip
                            build_cache(src.teacher, src.data, views=2, out=cache, augment_seed=src.augment_seed,  # type: ignore[arg-type]
                                        meta={"teacher_sha256": sha256_file(tmp / f"{teacher}.safetensors")})  # fmt: skip
                        tr = Trainer(cfg, tmp / f"t-{batch}-{amp}-{comp}-{mode}")
                        rate = f"{_rate(tr):.0f}"
                    except Exception as err:
                        rate = f"ERROR {type(err).__name__}: {str(err).splitlines()[0][:60]}"
                        traceback.print_exc(file=sys.stderr)
                    rows.append({"batch": batch, "amp": amp, "compile": comp, "mode": mode, "images_per_s": rate,
                                 "wall_s": round(time.perf_counter() - t0, 1)})  # fmt: skip
                    print(f"[gpu_check] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def check_accuracy(device: str, tmp: Path, quick: bool, data: str | None, teacher_ckpt: str | None) -> dict:
    """A short KD run (5 epochs; 1 in quick mode) and its final test accuracy."""
    root = Path(data) if data else None
    real = root is not None and root.exists()
    epochs = 1 if quick else 5
    teacher, student = ("resnet8", "resnet8") if quick else ("resnet32x4", "resnet8x4")
    if real:
        cfg = load_config(None, [f"data.root={root}"], base={
            "data": {"name": "cifar100", "root": str(root)}, "model": {"name": student}, "method": {"name": "kd"},
            "teacher": {"name": teacher, "checkpoint": teacher_ckpt or str(tmp / f"{teacher}.safetensors")},
            "train": {"epochs": epochs, "progress": False, "device": device}, "schedule": {"name": "cosine"},
        })  # fmt: skip
        if not teacher_ckpt and not (tmp / f"{teacher}.safetensors").exists():
            torch.manual_seed(0)
            ck.save_weights(tmp / f"{teacher}.safetensors", build(teacher).state_dict())
    else:
        cfg = _cfg(tmp, student, teacher, 128 if quick else 5000, 64, device, ["method.name=kd", f"train.epochs={epochs}"])
    t0 = time.perf_counter()
    res = Trainer(cfg, tmp / "accuracy-run").run()
    return {"data": str(root) if real else "synthetic", "teacher": teacher_ckpt or "random weights",
            "epochs": epochs, "final_test_acc": res.summary["final_test_acc"], "wall_s": round(time.perf_counter() - t0, 1),
            "images_per_s": res.summary.get("train_images_per_s")}  # fmt: skip


def table(rows: list[dict]) -> str:
    if not rows:
        return "(none)"
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device to check against the CPU (default: cuda)")
    p.add_argument("--quick", action="store_true", help="miniature of every part (seconds, for CPU tests)")
    p.add_argument("--data", help="CIFAR-100 folder for the 5-epoch run (synthetic when absent)")
    p.add_argument("--teacher", help="resnet32x4 checkpoint for the 5-epoch run (random weights when absent)")
    p.add_argument("--no-compile", action="store_true", help="skip the compile-on throughput rows")
    p.add_argument("--methods", help="comma-separated methods to check (default: every registered one)")
    p.add_argument("--out", default="gpu_check.md", help="markdown report (default: gpu_check.md)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: CUDA is not available (use --device cpu --quick for a CPU dry run)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    compile_modes = [False] if (args.quick or args.no_compile) else [False, True]
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        methods = check_methods(args.device, tmp, args.quick, args.methods.split(",") if args.methods else None)
        speed = check_throughput(args.device, tmp, args.quick, compile_modes)
        acc = check_accuracy(args.device, tmp, args.quick, args.data, args.teacher)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    report = "\n\n".join([
        f"# kdlab GPU check: {name}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s"
        + (" (quick)" if args.quick else ""),
        "## Loss and gradient agreement with the CPU (one batch, float32, TF32 off)",
        "(limits: loss 1e-3, gradients 1e-2 relative; a method that draws random numbers on the device, such as "
        "negative samples, can differ by design)", table(methods),
        "## Throughput (images/s, warm epoch)", table(speed),
        "## Short KD run", table([acc]),
    ])  # fmt: skip
    Path(args.out).write_text(report + "\n")
    print(report)
    bad = [r["method"] for r in methods if r["status"] != "ok"]
    failed = [f"{r['mode']} batch {r['batch']} {r['amp']}" for r in speed if str(r["images_per_s"]).startswith("ERROR")]
    print(f"\n{len(methods) - len(bad)}/{len(methods)} methods agree" + (f"; check: {', '.join(bad)}" if bad else "")
          + (f"; throughput errors: {', '.join(failed)}" if failed else ""))  # fmt: skip
    return 1 if bad or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
