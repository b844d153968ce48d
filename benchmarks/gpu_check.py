"""The GPU check of kdlab's fast path, as rows run most important first within a time budget.

Rows (``--plan`` lists them with their priority and time estimate):

* ``env`` — the machine: device, torch / CUDA / cuDNN, dense matmul TFLOP/s (bf16, fp32 with and without TF32).
* ``speed/MODE/bBATCH/AMP/COMPILE`` — images/s of resnet32x4 → resnet8x4 training on CIFAR-100 (the slice given by
  ``--data``; synthetic CIFAR-shaped images without it): ``live`` teacher, teacher ``cached`` (a 2-view teacher
  cache), ``student`` alone; batch 64 / 256 / 512; fp32 (``none``) / ``bf16``; ``eager`` / ``compiled``. The median of
  three timed epochs after a warm-up epoch (which holds compilation and cuDNN's autotuning), full batches only.
* ``agree/METHOD`` — every registered method: one training batch (resnet20 → resnet8, synthetic) on the device
  against the same batch on the CPU in float32 with TF32 off: the loss and every gradient.
* ``accuracy/teacher``, ``accuracy/kd``, ``accuracy/ce`` — short runs on the slice: resnet32x4 trained from scratch,
  resnet8x4 distilled from it (KD), resnet8x4 alone; their test accuracy. ``--teacher`` gives a resnet32x4 checkpoint
  instead of training one.
* ``bench`` — ``kdlab bench`` (an mdistiller-style loop against kdlab, batch 64).

``--budget SECONDS`` keeps a row only if it fits beside the more important rows already kept (a less important row is
never kept at the cost of a more important one); while running, each row's estimate is scaled by how the finished rows
compared with theirs, a row that no longer fits is dropped, and the run stops at the budget. The report (``--out``
markdown, ``--json`` every figure) is rewritten after every row, so a run cut short still leaves what it measured.
``--device cpu --quick`` is a miniature of every row on the CPU (the tests run it).
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here: importing torch and kdlab is part of the run

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from kdlab.config import load_config
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.methods import METHODS
from kdlab.models import build

PARAMS = {"crd": ["method.nce_k=64"]}  # a small training set cannot feed the default 16384 negatives
BATCHES = (512, 256, 64)
MODES = ("cached", "student", "live")
GOAL = 40000  # images/s, teacher cache, batch 512, bf16: a 240-epoch CIFAR-100 run (50,000 images) in 5 minutes

# ---------------------------------------------------------------------------------------------------------------------
# Time estimates. Guesses for one H200 until a run is measured (``--calibrate`` reads a previous run's JSON and uses
# each row's measured seconds instead): images/s of a training step at batch 512 for resnet32x4 → resnet8x4, the
# per-step launch cost of an eager step, compile seconds, and set-up seconds. The run records estimate and wall time
# of every row, so the next run can be planned from measurements.
RATE_GUESS = {("live", "none"): 7000, ("live", "bf16"): 18000, ("cached", "none"): 25000,
              ("cached", "bf16"): 45000, ("student", "none"): 28000, ("student", "bf16"): 50000}  # fmt: skip
STEP_S = {"live": 0.008, "cached": 0.005, "student": 0.004}  # eager; compiled (CUDA graphs) steps cost STEP_S / 8
COMPILE_S = {"student": 60.0, "teacher": 45.0}
SETUP_S = 4.0  # models, BatchNorm folding, data onto the device
CACHE_S = 6.0  # a 2-view teacher cache of the training images
AGREE_S = 2.5
TEACHER_RATE, EVAL_RATE = 10000, 40000  # resnet32x4 training at batch 128 in bf16; evaluation


class BudgetExceeded(Exception):
    """The run reached its budget inside a row."""


@dataclass
class Row:
    """One measurement: ``fn`` returns its figures (``_status`` in them overrides ``ok``)."""

    key: str
    part: str
    priority: int  # lower runs first and is dropped last
    estimate_s: float
    fn: Callable[[], dict] = field(repr=False)
    needs: tuple[str, ...] = ()
    status: str = "planned"  # ok | differs | error | dropped | skipped | stopped
    wall_s: float | None = None
    result: dict = field(default_factory=dict)
    note: str = ""

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "fn"}


def select(rows: list[Row], budget_s: float) -> list[Row]:
    """The rows to run, most important first: each row, in priority order (plan order within a priority), is kept when
    its estimate fits in what the rows kept before it leave of ``budget_s`` and every row it needs is kept; the
    others are marked ``dropped``."""
    kept: list[Row] = []
    used, names = 0.0, set()
    for r in sorted(rows, key=lambda r: r.priority):
        if not all(n in names for n in r.needs):
            r.status, r.note = "dropped", f"needs {', '.join(n for n in r.needs if n not in names)}"
        elif used + r.estimate_s > budget_s:
            r.status, r.note = "dropped", f"budget: {r.estimate_s:.0f} s estimated, {budget_s - used:.0f} s left"
        else:
            kept.append(r)
            used += r.estimate_s
            names.add(r.key)
    return kept


@contextmanager
def alarm_at(deadline: float, clock: Callable[[], float] = time.monotonic) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the main thread at ``deadline`` (no-op where SIGALRM is missing)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):  # noqa: ANN001
        raise BudgetExceeded

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - clock(), 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_rows(
    rows: list[Row], deadline: float, clock: Callable[[], float] = time.monotonic,
    after: Callable[[Row], None] = lambda r: None,
) -> None:  # fmt: skip
    """Run the selected ``rows`` in order until ``deadline`` (a ``clock()`` value). Before each row its estimate is
    scaled by the finished rows' wall time over their estimates (clamped to 0.5–4); a row that no longer fits, or
    whose needs did not succeed, is not run. ``after(row)`` sees every row as it ends."""
    est = wall = 0.0
    done: dict[str, str] = {}
    for i, r in enumerate(rows):
        failed = [n for n in r.needs if done.get(n) != "ok"]
        scale = min(max(wall / est, 0.5), 4.0) if est > 0 else 1.0
        if failed:
            r.status, r.note = "skipped", f"needs {', '.join(failed)}"
        elif clock() + r.estimate_s * scale > deadline:
            r.status, r.note = "dropped", f"budget at run time: {r.estimate_s * scale:.0f} s expected, " \
                                          f"{max(deadline - clock(), 0):.0f} s left"  # fmt: skip
        else:
            t0 = clock()
            try:
                r.result = r.fn()
                r.status = r.result.pop("_status", "ok")
            except BudgetExceeded:
                r.status, r.note = "stopped", "the budget ran out inside this row"
            except Exception as err:  # every row is reported, whatever fails
                r.status, r.note = "error", f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
                traceback.print_exc(file=sys.stderr)
            r.wall_s = round(clock() - t0, 2)
            est, wall = est + r.estimate_s, wall + r.wall_s
        done[r.key] = r.status
        after(r)
        if r.status == "stopped":
            for rest in rows[i + 1 :]:
                rest.status, rest.note = "dropped", "the budget ran out"
                after(rest)
            return


# ---------------------------------------------------------------------------------------------------------------------
# The measurements


@dataclass
class Ctx:
    device: str
    tmp: Path
    quick: bool
    data: Path | None  # a CIFAR-100 folder (train.npz, test.npz), or None for synthetic data
    teacher_ckpt: str | None
    teacher_epochs: int
    student_epochs: int
    cache: Path | None = None
    flops: dict = field(default_factory=dict)  # per-image forward FLOPs of the models, matmul peaks

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def pair(self) -> tuple[str, str]:
        return ("resnet8", "resnet8") if self.quick else ("resnet32x4", "resnet8x4")

    @property
    def speed_images(self) -> int:
        return 64 if self.quick else 20000  # the slice's training images

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def random_teacher(self, name: str) -> Path:
        """A seeded random-weight checkpoint of ``name`` (agreement and throughput need weights, not accuracy)."""
        path = self.tmp / f"{name}.safetensors"
        if not path.exists():
            torch.manual_seed(0)
            ck.save_weights(path, build(name).state_dict())
        return path


def _data(ctx: Ctx, n: int, max_test: int | None = None) -> dict:
    """The data section: the slice's first ``n`` training images, or ``n`` synthetic CIFAR-shaped ones."""
    if ctx.data is not None:
        d = {"name": "cifar100", "root": str(ctx.data), "max_train_samples": n}
        return d | ({"max_test_samples": max_test} if max_test else {})
    test = max_test or 64
    return {"name": "synthetic", "num_samples": n + test, "train_split": n / (n + test), "num_classes": 100}


def _speed_data(ctx: Ctx) -> dict:
    return _data(ctx, ctx.speed_images, 64 if ctx.quick else 512)


def _cfg(ctx: Ctx, student: str, teacher: str | Path | None, data: dict, train: dict, extra: list[str],
         method: str | None = None, schedule: str = "constant"):  # fmt: skip
    base: dict = {
        "data": data, "model": {"name": student},
        "method": {"name": method or ("ce" if teacher is None else "kd")},
        "train": {"progress": False, "device": ctx.device} | train, "schedule": {"name": schedule},
    }  # fmt: skip
    if teacher is not None:
        name, path = (teacher, ctx.random_teacher(teacher)) if isinstance(teacher, str) else (ctx.pair[0], teacher)
        base["teacher"] = {"name": name, "checkpoint": str(path)}
    return load_config(None, extra, base=base)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def env_row(ctx: Ctx) -> dict:
    from kdlab.bench import forward_flops, matmul_flops

    dev = torch.device(ctx.device)
    n, secs = (256, 0.05) if ctx.quick else (8192, 1.0)
    out: dict = {"torch": torch.__version__, "python": platform.python_version(), "device": ctx.device}
    if ctx.cuda:
        p = torch.cuda.get_device_properties(dev)
        out.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    else:
        out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        out["bf16_tflops"] = matmul_flops(dev, torch.bfloat16, n, secs) / 1e12
        torch.backends.cuda.matmul.allow_tf32 = False
        out["fp32_tflops"] = matmul_flops(dev, torch.float32, n, secs) / 1e12
        if ctx.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            out["tf32_tflops"] = matmul_flops(dev, torch.float32, n, secs) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    teacher, student = ctx.pair
    out["teacher_gflop"] = forward_flops(build(teacher)) / 1e9
    out["student_gflop"] = forward_flops(build(student)) / 1e9
    ctx.flops.update(out)
    return out


def _teacher_cache(ctx: Ctx) -> Path:
    """One 2-view teacher cache of the speed rows' training images (built once, float32 teacher)."""
    from kdlab.engine.atomic import sha256_file
    from kdlab.engine.teacher_cache import build_cache

    if ctx.cache is None:
        teacher, student = ctx.pair
        src = Trainer(_cfg(ctx, student, teacher, _speed_data(ctx), {"batch_size": 512}, ["train.amp=none"]),
                      ctx.tmp / "cache-src")  # the speed rows' data exactly: the cache is keyed by sample
        path = ctx.tmp / "cache.safetensors"
        build_cache(src.teacher, src.data, views=2, out=path, augment_seed=src.augment_seed, fast=src.fast,  # type: ignore[arg-type]
                    meta={"teacher_sha256": sha256_file(ctx.random_teacher(teacher))})  # fmt: skip
        ctx.cache = path
        del src
    return ctx.cache


def _speed_cfg(ctx: Ctx, mode: str, batch: int, amp: str, compiled: bool, cache: Path | None):
    teacher, student = ctx.pair
    extra = [f"train.amp={amp}", f"train.compile={str(compiled).lower()}", "train.drop_last=true"]
    if cache is not None:
        extra.append(f"teacher.cache={cache}")
    return _cfg(ctx, student, None if mode == "student" else teacher, _speed_data(ctx),
                {"epochs": 100, "batch_size": batch}, extra)


def speed_row(ctx: Ctx, mode: str, batch: int, amp: str, compiled: bool) -> dict:
    """Images/s of ``mode`` (live / cached / student): median of the timed epochs after one warm-up epoch."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if compiled:
        torch.compiler.reset()  # each compiled row starts clean: no recompile limit carried over from the last row
    cfg = _speed_cfg(ctx, mode, batch, amp, compiled, _teacher_cache(ctx) if mode == "cached" else None)
    tr = Trainer(cfg, ctx.tmp / f"speed-{mode}-{batch}-{amp}-{compiled}")
    images = tr.data.num_train // batch * batch
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    tr.train_epoch(1)
    ctx.sync()
    warm = time.perf_counter() - t0
    rates = []
    for epoch in range(2, 3 if ctx.quick else 5):
        t0 = time.perf_counter()
        tr.train_epoch(epoch)
        ctx.sync()
        rates.append(images / (time.perf_counter() - t0))
    rate = statistics.median(rates)
    out = {"mode": mode, "batch": batch, "amp": amp, "compile": compiled, "images_per_s": rate,
           "epoch_rates": [round(r, 1) for r in rates], "images_per_epoch": images, "warmup_s": round(warm, 2),
           "data": cfg.data.name}  # fmt: skip
    if ctx.cuda:
        out["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if "teacher_gflop" in ctx.flops:  # model FLOP/s against the measured matmul peak of the step's precision
        per_image = 3 * ctx.flops["student_gflop"] + (ctx.flops["teacher_gflop"] if mode == "live" else 0.0)
        peak = ctx.flops.get("bf16_tflops" if amp == "bf16" else "tf32_tflops", ctx.flops.get("fp32_tflops"))
        out["model_tflops"] = rate * per_image / 1e3
        if peak:
            out["peak_fraction"] = out["model_tflops"] / peak
    del tr
    _free()
    return out


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
    return loss.item(), [p.grad.detach().float().cpu() for p in params if p.grad is not None]


def agree_row(ctx: Ctx, name: str) -> dict:
    """Loss and gradient agreement of ``name``, device against CPU, float32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    teacher, n, batch = ("resnet8", 64, 16) if ctx.quick else ("resnet20", 256, 64)
    extra = [f"method.name={name}", "train.amp=none", *PARAMS.get(name, [])]
    synthetic = {"name": "synthetic", "num_samples": n + 64, "train_split": n / (n + 64), "num_classes": 100}
    runs = []
    for dev in ("cpu", ctx.device):
        cfg = _cfg(ctx, "resnet8", teacher if METHODS.get(name).needs_teacher else None, synthetic,
                   {"epochs": 5, "batch_size": batch, "device": dev}, extra)  # fmt: skip
        runs.append(Trainer(cfg, ctx.tmp / f"agree-{name}-{len(runs)}"))
    runs[1].student.load_state_dict(runs[0].student.state_dict())
    runs[1].method.load_state_dict(runs[0].method.state_dict())
    (l0, g0), (l1, g1) = _one_step(runs[0]), _one_step(runs[1])
    grad_err = max(((a - b).norm() / a.norm().clamp_min(1e-12)).item() for a, b in zip(g0, g1)) if g0 else 0.0
    loss_err = abs(l0 - l1) / max(abs(l0), 1e-12)
    ok = len(g0) == len(g1) and loss_err < 1e-3 and grad_err < 1e-2 and math.isfinite(l1)
    del runs
    _free()
    return {"method": name, "loss_cpu": l0, "loss_dev": l1, "loss_rel_err": loss_err, "grad_rel_err": grad_err,
            "_status": "ok" if ok else "differs"}  # fmt: skip


def _accuracy_cfg(ctx: Ctx, student: str, teacher: Path | None, method: str, epochs: int):
    train_n, test_n = (256, 128) if ctx.quick else (20000, None)
    return _cfg(ctx, student, teacher, _data(ctx, train_n, test_n),
                {"epochs": epochs, "batch_size": 128, "amp": "auto"},
                ["optim.lr=0.1", "schedule.warmup_epochs=1"] if epochs > 2 else [], method, "cosine")  # fmt: skip


def accuracy_row(ctx: Ctx, which: str) -> dict:
    """``teacher``: the teacher trained from scratch; ``kd``: the student distilled from it; ``ce``: the student alone."""
    teacher, student = ctx.pair
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    trained = Path(ctx.teacher_ckpt) if ctx.teacher_ckpt else ctx.tmp / "acc-teacher"
    if which == "teacher":
        cfg = _accuracy_cfg(ctx, teacher, None, "ce", ctx.teacher_epochs)
    else:
        cfg = _accuracy_cfg(ctx, student, trained if which == "kd" else None, which, ctx.student_epochs)
    res = Trainer(cfg, ctx.tmp / f"acc-{which}").run()
    s = res.summary
    _free()
    return {"run": which, "model": s["model"], "teacher": s["teacher"], "epochs": s["epochs"], "data": cfg.data.name,
            "train_images": cfg.data.max_train_samples, "final_test_acc": s["final_test_acc"],
            "best_test_acc": s["best_test_acc"], "teacher_test_acc": s["teacher_test_acc"],
            "wall_s": s["wall_time_s"], "train_images_per_s": s["train_images_per_s"]}  # fmt: skip


def bench_row(ctx: Ctx) -> dict:
    from kdlab.bench import run_bench

    teacher, student = ctx.pair
    res = run_bench(teacher, student, ctx.device, images=128 if ctx.quick else 20000, batch_size=64,
                    rounds=1 if ctx.quick else 3, workers=0 if ctx.quick else 2, bf16=True,
                    log=lambda s: print(s, file=sys.stderr))  # fmt: skip
    _free()
    return {k: v for k, v in res.items() if k != "load_average"}


# ---------------------------------------------------------------------------------------------------------------------
# The plan


def _speed_estimate(ctx: Ctx, mode: str, batch: int, amp: str, compiled: bool) -> float:
    if ctx.quick:
        return 1.0
    n = ctx.speed_images // batch * batch
    step = STEP_S[mode] / (8 if compiled else 1)
    epoch = n // batch * step + n / RATE_GUESS[(mode, amp)]
    compile_s = (COMPILE_S["student"] + (COMPILE_S["teacher"] if mode == "live" else 0)) if compiled else 0.0
    return round(SETUP_S + 4 * epoch + compile_s, 1)


def _accuracy_estimate(ctx: Ctx, which: str) -> float:
    if ctx.quick:
        return 3.0
    epochs = ctx.teacher_epochs if which == "teacher" else ctx.student_epochs
    rate = {"teacher": TEACHER_RATE, "kd": RATE_GUESS[("live", "bf16")] * 0.6, "ce": RATE_GUESS[("student", "bf16")] * 0.6}
    return round(SETUP_S + epochs * (20000 / rate[which] + 2 * 10000 / EVAL_RATE), 1)  # two evaluations an epoch at most


def plan(ctx: Ctx, methods: list[str], compile_modes: tuple[bool, ...]) -> list[Row]:
    """Every row with its priority (0 first) and estimate; the order within a priority is the run order."""
    rows = [Row("env", "env", 0, 1.0 if ctx.quick else 8.0, lambda: env_row(ctx))]

    def speed(priority: int, batch: int, amp: str, compiled: bool, modes: tuple[str, ...] = MODES) -> None:
        if compiled not in compile_modes or (ctx.quick and batch != 512):
            return
        for m in modes:
            est = _speed_estimate(ctx, m, batch, amp, compiled) + (CACHE_S if m == "cached" and not ctx.quick else 0)
            b = 16 if ctx.quick else batch
            rows.append(Row(f"speed/{m}/b{b}/{amp}/{'compiled' if compiled else 'eager'}", "speed", priority, est,
                            lambda m=m, b=b: speed_row(ctx, m, b, amp, compiled)))  # fmt: skip

    speed(1, 512, "bf16", False)  # the headline: the teacher cache at batch 512 in bf16
    for name in methods:
        rows.append(Row(f"agree/{name}", "agree", 2, 0.4 if ctx.quick else AGREE_S,
                        lambda name=name: agree_row(ctx, name)))  # fmt: skip
    if not ctx.teacher_ckpt:
        rows.append(Row("accuracy/teacher", "accuracy", 3, _accuracy_estimate(ctx, "teacher"),
                        lambda: accuracy_row(ctx, "teacher")))  # fmt: skip
    rows.append(Row("accuracy/kd", "accuracy", 3, _accuracy_estimate(ctx, "kd"), lambda: accuracy_row(ctx, "kd"),
                    () if ctx.teacher_ckpt else ("accuracy/teacher",)))  # fmt: skip
    speed(4, 512, "bf16", True, ("cached", "student"))
    speed(5, 512, "none", False)
    speed(6, 256, "bf16", False)
    speed(6, 64, "bf16", False)
    rows.append(Row("bench", "bench", 7, 5.0 if ctx.quick else 60.0, lambda: bench_row(ctx)))
    rows.append(Row("accuracy/ce", "accuracy", 8, _accuracy_estimate(ctx, "ce"), lambda: accuracy_row(ctx, "ce")))
    speed(9, 512, "bf16", True, ("live",))
    speed(10, 256, "none", False)
    speed(10, 64, "none", False)
    for batch in (256, 64):
        speed(11, batch, "bf16", True)
    speed(12, 512, "none", True)
    for batch in (256, 64):
        speed(12, batch, "none", True)
    return rows


def calibrate(rows: list[Row], previous: Path) -> int:
    """Replace the estimates of rows a previous run measured (its JSON) by their wall time; returns how many."""
    walls = {r["key"]: r["wall_s"] for r in json.loads(previous.read_text())["rows"]
             if r.get("wall_s") and r.get("status") in ("ok", "differs")}  # fmt: skip
    for r in rows:
        if r.key in walls:
            r.estimate_s = walls[r.key]
    return sum(r.key in walls for r in rows)


# ---------------------------------------------------------------------------------------------------------------------
# The report


def table(rows: list[dict], keys: list[str] | None = None) -> str:
    if not rows:
        return "(none)"
    keys = keys or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: object) -> str:
        if isinstance(v, bool) or v is None:
            return "" if v is None else str(v)
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
        if isinstance(v, list):
            return " / ".join(fmt(x) for x in v)
        return str(v)

    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows])  # fmt: skip


def _cell(r: Row | None) -> object:
    if r is None:
        return None
    if r.status == "ok":
        return r.result["images_per_s"]
    return r.status


def report(rows: list[Row], meta: dict) -> str:
    by = {r.key: r for r in rows}
    env = by["env"].result if by.get("env") and by["env"].status == "ok" else {}
    head = (f"# kdlab GPU check: {env.get('name', meta['device'])}, torch {meta['torch']}, {meta['started']}, "
            f"{meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s budget" + (" (quick)" if meta["quick"] else ""))
    parts = [head]
    b = 16 if meta["quick"] else 512
    lines = []
    for comp in ("eager", "compiled"):
        r = by.get(f"speed/cached/b{b}/bf16/{comp}")
        if r is not None and r.status == "ok":
            rate = r.result["images_per_s"]
            lines.append(f"**teacher cache, batch {b}, bf16, {comp}: {rate:,.0f} images/s** (goal ≥ {GOAL:,}); a "
                         f"240-epoch CIFAR-100 run (50,000 images) at this rate: {240 * 50000 / rate / 60:.1f} min")
    if meta["quick"]:
        lines = ["(quick: a miniature of every row, resnet8 → resnet8 at batch 16; no figure here says anything about "
                 "a GPU)"]
    parts.append("\n\n".join(lines) or "(the headline row did not run)")
    if env:
        parts += ["## Machine", table([env])]
    speed = [r for r in rows if r.part == "speed"]
    grid = []
    for batch in dict.fromkeys(r.key.split("/")[2] for r in speed):
        for amp in ("bf16", "none"):
            for comp in ("eager", "compiled"):
                cells = {m: by.get(f"speed/{m}/{batch}/{amp}/{comp}") for m in MODES}
                if not any(c is not None and c.status != "planned" for c in cells.values()):
                    continue
                row = {"batch": batch[1:], "precision": "fp32" if amp == "none" else amp, "compile": comp}
                row.update({m: _cell(cells[m]) for m in ("live", "cached", "student")})
                c, s = cells["cached"], cells["student"]
                if c and s and c.status == s.status == "ok":
                    row["cached/student"] = c.result["images_per_s"] / s.result["images_per_s"]
                live = cells["live"]
                if live is not None and live.status == "ok":
                    row["live peak MiB"] = live.result.get("peak_mib")
                    row["live % of peak"] = 100 * live.result.get("peak_fraction", float("nan"))
                grid.append(row)
    data = next((r.result.get("data") for r in speed if r.status == "ok"), "?")
    parts += [f"## Throughput: {'→'.join(_pair(meta))}, images/s ({data} training images; median of the warm epochs; "
              "live = teacher forward every step, cached = teacher cache, student = the student alone)", table(grid)]
    agree = [r for r in rows if r.part == "agree" and r.status not in ("planned",)]
    parts += ["## Loss and gradient agreement with the CPU (one batch, float32, TF32 off)",
              "(limits: loss 1e-3, gradients 1e-2 relative; a method that draws random numbers on the device, such as "
              "CRD's negative samples, can differ by design)",
              table([r.result | {"method": r.key.split("/", 1)[1], "status": r.status, "note": r.note} for r in agree],
                    ["method", "loss_cpu", "loss_dev", "loss_rel_err", "grad_rel_err", "status", "note"])]  # fmt: skip
    acc = [r.result if r.status == "ok" else {"run": r.key.split("/")[1], "status": r.status, "note": r.note}
           for r in rows if r.part == "accuracy" and r.status != "planned"]  # fmt: skip
    parts += ["## Short CIFAR-100 runs (accuracy in %)", table(acc)]
    bench = by.get("bench")
    if bench is not None and bench.status == "ok":
        parts += [f"## kdlab bench: an mdistiller-style loop against kdlab (batch {bench.result['batch_size']})",
                  table(bench.result["rows"], ["mode", "images_per_s", "best_images_per_s", "vs_reference",
                                               "peak_fraction", "peak_mem_mib"])]  # fmt: skip
    elif bench is not None and bench.status != "planned":
        parts += ["## kdlab bench", f"{bench.status}: {bench.note}"]
    left = [r for r in rows if r.status in ("dropped", "skipped", "stopped", "error")]
    if left:
        parts += ["## Rows not measured", table([{"row": r.key, "priority": r.priority, "estimate_s": r.estimate_s,
                                                  "status": r.status, "why": r.note} for r in left])]  # fmt: skip
    return "\n\n".join(parts) + "\n"


def _pair(meta: dict) -> tuple[str, str]:
    return ("resnet8", "resnet8") if meta["quick"] else ("resnet32x4", "resnet8x4")


def _write(path: Path | None, text: str) -> None:
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def main(argv: list[str] | None = None, t0: float | None = None) -> int:
    """The CLI; the budget counts from ``t0`` (a ``time.monotonic()`` value; default: now)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device to check against the CPU (default: cuda)")
    p.add_argument("--quick", action="store_true", help="miniature of every row (seconds, for CPU tests)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all rows (default 420)")
    p.add_argument("--data", help="CIFAR-100 folder (train.npz, test.npz; the device bundle's decoded slice)")
    p.add_argument("--teacher", help="resnet32x4 checkpoint for the KD run (trained on the data when absent)")
    p.add_argument("--teacher-epochs", type=int, default=20, help="epochs of the teacher run (default 20)")
    p.add_argument("--student-epochs", type=int, default=20, help="epochs of the student runs (default 20)")
    p.add_argument("--no-compile", action="store_true", help="no compiled throughput rows")
    p.add_argument("--methods", help="comma-separated methods to check (default: every registered one)")
    p.add_argument("--calibrate", help="a previous run's JSON: its measured seconds replace the estimates")
    p.add_argument("--plan", action="store_true", help="print the rows the budget keeps and drops, run nothing")
    p.add_argument("--out", default="gpu_check.md", help="markdown report (default: gpu_check.md)")
    p.add_argument("--json", help="every figure as JSON")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.plan:
        print("gpu_check: error: CUDA is not available (use --device cpu --quick for a CPU dry run)", file=sys.stderr)
        return 2
    methods = args.methods.split(",") if args.methods else METHODS.names()
    unknown = [m for m in methods if m not in METHODS.names()]
    if unknown:
        print(f"gpu_check: error: unknown method(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.quick:
        args.teacher_epochs = args.student_epochs = 1
    t_start, started = time.monotonic() if t0 is None else t0, datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    compile_modes = (False,) if (args.quick or args.no_compile) else (False, True)
    with tempfile.TemporaryDirectory() as tmp_:
        ctx = Ctx(args.device, Path(tmp_), args.quick, Path(args.data) if args.data else None, args.teacher,
                  args.teacher_epochs, args.student_epochs)  # fmt: skip
        rows = plan(ctx, methods, compile_modes)
        if args.calibrate:
            print(f"[gpu_check] {calibrate(rows, Path(args.calibrate))} estimates from {args.calibrate}", file=sys.stderr)
        kept = select(rows, args.budget - (time.monotonic() - t_start))  # start-up (imports) already spent
        if args.plan:
            for r in sorted(rows, key=lambda r: r.priority):
                print(f"{r.priority:>3}  {r.estimate_s:7.1f} s  {'run ' if r in kept else 'drop'}  {r.key}")
            print(f"{len(kept)}/{len(rows)} rows, {sum(r.estimate_s for r in kept):.0f} s of {args.budget:.0f} s "
                  f"(all rows: {sum(r.estimate_s for r in rows):.0f} s)")  # fmt: skip
            return 0
        meta = {"device": args.device, "torch": torch.__version__, "started": started, "budget_s": args.budget,
                "quick": args.quick, "argv": sys.argv[1:] if argv is None else argv,
                "planned_s": sum(r.estimate_s for r in kept), "load_average": os.getloadavg()}  # fmt: skip
        out, js = Path(args.out), Path(args.json) if args.json else None

        def after(r: Row) -> None:
            meta["elapsed_s"] = time.monotonic() - t_start
            shown = r.result.get("images_per_s", r.note)
            print(f"[gpu_check] {meta['elapsed_s']:6.0f} s  {r.key}: {r.status} ({r.wall_s} s; est {r.estimate_s} s)"
                  f" {shown if isinstance(shown, str) else f'{shown:,.0f} images/s'}", file=sys.stderr, flush=True)
            _write(out, report(rows, meta))
            _write(js, json.dumps({"meta": meta, "rows": [x.record() for x in rows]}, indent=1, default=str))

        deadline = t_start + args.budget - 3  # the last report is written after the deadline
        try:
            with alarm_at(deadline):
                run_rows(kept, deadline, after=after)
        except BudgetExceeded:  # between two rows, while the report was written
            for r in kept:
                if r.status == "planned":
                    r.status, r.note = "dropped", "the budget ran out"
        meta["elapsed_s"] = time.monotonic() - t_start
        text = report(rows, meta)
        _write(out, text)
        _write(js, json.dumps({"meta": meta, "rows": [x.record() for x in rows]}, indent=1, default=str))
    print(text)
    agree = [r for r in rows if r.part == "agree" and r.status in ("ok", "differs", "error")]
    bad = [r.key.split("/", 1)[1] for r in agree if r.status != "ok"]
    errors = [r.key for r in rows if r.status == "error" and r.part != "agree"]
    dropped = sum(r.status in ("dropped", "skipped", "stopped") for r in rows)
    print(f"{len(agree) - len(bad)}/{len(agree)} methods agree" + (f"; check: {', '.join(bad)}" if bad else "")
          + (f"; errors: {', '.join(errors)}" if errors else "") + f"; {dropped} rows not run (budget)")  # fmt: skip
    return 1 if bad or errors else 0


if __name__ == "__main__":
    raise SystemExit(main(t0=_T0))
