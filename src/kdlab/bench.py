"""``kdlab bench``: distillation throughput of kdlab against the way the standard KD codebases train.

Four modes, measured in one process on CIFAR-shaped synthetic data (uint8 3×32×32, random labels):

(a) ``reference`` — a ``DataLoader`` with worker processes over a dataset that pads, crops, flips and normalises one
    image at a time (as torchvision transforms do), batch 64, float32, teacher forward every step, KD loss;
(b) ``live`` — kdlab's training step (:class:`kdlab.engine.Trainer`): data resident on the device, batched
    augmentation there, inference-mode teacher, and on CUDA channels_last / autocast / optional compile;
(c) ``cached`` — the same with a teacher-output cache (no teacher forward);
(d) ``student`` — the student alone (cross-entropy), the upper bound for (c).

It also measures the machine's dense matmul FLOP/s and reports the model FLOP/s achieved by (b) and (c).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kdlab import losses
from kdlab.data.augment import CIFAR100_MEAN, CIFAR100_STD


@dataclass
class BenchResult:
    mode: str
    images_per_s: float
    model_flop_per_image: float | None = None


# --------------------------------------------------------------------------------------------------------------------
# (a) the reference loop


class PerImageCifar(torch.utils.data.Dataset):
    """What the standard codebases do: augment one HWC uint8 image at a time inside ``__getitem__``."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images_hwc, labels
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))  # RandomCrop(32, padding=4): zero padding
        dy, dx = np.random.randint(0, 9, size=2)
        img = img[dy : dy + 32, dx : dx + 32]
        if np.random.rand() < 0.5:  # RandomHorizontalFlip
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)  # ToTensor
        return (x - self.mean) / self.std, int(self.labels[i])  # Normalize


def reference_epoch(
    teacher: nn.Module, student: nn.Module, images_hwc: np.ndarray, labels: np.ndarray, device: torch.device,
    batch_size: int = 64, workers: int | None = None,
) -> float:  # fmt: skip
    """One epoch of the reference loop; returns images/s (worker start-up included, as in every real epoch)."""
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(
        PerImageCifar(images_hwc, labels), batch_size=batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    teacher.eval()
    student.train()
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        loss = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * losses.kd(s_logits, t_logits, temperature=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    _sync(device)
    return n / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------------------------------
# machine and model FLOPs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """Measured dense matmul FLOP/s (n×n×n, repeated for about ``seconds``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def forward_flops(model: nn.Module, shape: tuple[int, ...] = (1, 3, 32, 32)) -> float:
    """FLOPs of one forward pass per image (multiply-add = 2 FLOPs), by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(*shape)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.cpu()(x)
    model.train(was_training)
    return counter.get_total_flops() / shape[0]


# --------------------------------------------------------------------------------------------------------------------
# (b)-(d) kdlab's engine


def _trainer(student: str, teacher: str | None, n: int, batch: int, device: str, tmp: Path, extra: list[str]):
    from kdlab.config import load_config
    from kdlab.engine import Trainer

    base = {
        "data": {"name": "synthetic", "num_samples": n + 100, "train_split": n / (n + 100), "num_classes": 100},
        "model": {"name": student},
        "method": {"name": "ce"} if teacher is None else {"name": "kd", "temperature": 4.0},
        "train": {"epochs": 2, "batch_size": batch, "progress": False, "device": device},
        "schedule": {"name": "constant"},
    }  # fmt: skip
    if teacher is not None:
        base["teacher"] = {"name": teacher, "checkpoint": str(tmp / "teacher.safetensors")}
    cfg = load_config(None, extra, base=base)
    return Trainer(cfg, tmp / f"run-{len(list(tmp.iterdir()))}")


def _time_epochs(trainer, epochs: int = 2) -> float:
    """images/s of the last of ``epochs`` training epochs (the first one warms up)."""
    rate = 0.0
    for epoch in range(1, epochs + 1):
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_epoch(epoch)
        _sync(trainer.device)
        rate = len(trainer.data.train) / (time.perf_counter() - t0)
    return rate


def run_bench(
    teacher: str | None = None, student: str | None = None, device: str = "auto", images: int | None = None,
    batch_size: int = 64, amp: str | None = None, compile: bool = False, workers: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Measure the four modes; returns a dict with the table rows and the speed-ups."""
    from kdlab.engine import checkpoint as ck
    from kdlab.engine.atomic import sha256_file
    from kdlab.engine.teacher_cache import build_cache
    from kdlab.engine.trainer import select_device
    from kdlab.models import build

    dev = select_device(device)
    cuda = dev.type == "cuda"
    teacher = teacher or ("resnet32x4" if cuda else "resnet20")
    student = student or ("resnet8x4" if cuda else "resnet8")
    images = images or (20000 if cuda else 1024)
    amp = amp or ("bf16" if cuda else "none")
    extra = [f"train.amp={amp}", f"train.compile={str(compile).lower()}"]
    torch.manual_seed(0)
    t_model, s_model = build(teacher), build(student)
    t_flops, s_flops = forward_flops(t_model), forward_flops(s_model)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, size=images)
    rows: list[BenchResult] = []
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        ck.save_weights(tmp / "teacher.safetensors", t_model.state_dict())

        log(f"[bench] {teacher} → {student}, {images} images, batch {batch_size}, device {dev}")
        ref_t, ref_s = build(teacher).to(dev), build(student).to(dev)
        ref_t.load_state_dict(t_model.state_dict())
        reference_epoch(ref_t, ref_s, imgs[: min(images, 4 * batch_size)], labels, dev, batch_size, workers)  # warm-up
        rows.append(BenchResult("reference", reference_epoch(ref_t, ref_s, imgs, labels, dev, batch_size, workers),
                                t_flops + 3 * s_flops))  # fmt: skip
        log(f"[bench] reference {rows[-1].images_per_s:.0f} img/s")

        live = _trainer(student, teacher, images, batch_size, device, tmp, extra)
        rows.append(BenchResult("live", _time_epochs(live), t_flops + 3 * s_flops))
        log(f"[bench] live {rows[-1].images_per_s:.0f} img/s")

        cache_path = tmp / "cache.safetensors"
        build_cache(live.teacher, live.data, views=2, out=cache_path, augment_seed=live.augment_seed,  # type: ignore[arg-type]
                    meta={"teacher_sha256": sha256_file(tmp / "teacher.safetensors")})  # fmt: skip
        del live
        cached = _trainer(student, teacher, images, batch_size, device, tmp, extra + [f"teacher.cache={cache_path}"])
        rows.append(BenchResult("cached", _time_epochs(cached), 3 * s_flops))
        log(f"[bench] cached {rows[-1].images_per_s:.0f} img/s")
        del cached

        alone = _trainer(student, None, images, batch_size, device, tmp, extra)
        rows.append(BenchResult("student", _time_epochs(alone), 3 * s_flops))
        log(f"[bench] student alone {rows[-1].images_per_s:.0f} img/s")

    peak_dtype = torch.bfloat16 if (cuda and amp == "bf16") else torch.float32
    peak = matmul_flops(dev, peak_dtype)
    ref = rows[0].images_per_s
    return {
        "teacher": teacher, "student": student, "device": str(dev), "images": images, "batch_size": batch_size,
        "amp": amp, "compile": compile, "peak_flops": peak, "peak_dtype": str(peak_dtype).replace("torch.", ""),
        "rows": [
            {"mode": r.mode, "images_per_s": r.images_per_s, "vs_reference": r.images_per_s / ref,
             "model_flops": r.images_per_s * r.model_flop_per_image if r.model_flop_per_image else None}
            for r in rows
        ],
        "speedup_live": rows[1].images_per_s / ref,
        "speedup_cached": rows[2].images_per_s / ref,
        "cached_vs_student": rows[2].images_per_s / rows[3].images_per_s,
        "teacher_gflop_per_image": t_flops / 1e9, "student_gflop_per_image": s_flops / 1e9,
    }  # fmt: skip


def format_report(res: dict) -> str:
    lines = [
        f"kdlab bench: {res['teacher']} → {res['student']} on {res['device']}, {res['images']} CIFAR-shaped images, "
        f"batch {res['batch_size']}, amp {res['amp']}, compile {res['compile']}",
        f"forward GFLOP/image: teacher {res['teacher_gflop_per_image']:.4f}, student {res['student_gflop_per_image']:.4f}",
        "",
        "| mode | images/s | vs reference | model GFLOP/s | % of matmul peak |",
        "|---|---|---|---|---|",
    ]
    desc = {"reference": "(a) reference loop", "live": "(b) kdlab live teacher", "cached": "(c) kdlab teacher cache",
            "student": "(d) student alone"}  # fmt: skip
    for r in res["rows"]:
        mf = r["model_flops"]
        lines.append(
            f"| {desc[r['mode']]} | {r['images_per_s']:.0f} | {r['vs_reference']:.2f}× | "
            f"{mf / 1e9:.1f} | {100 * mf / res['peak_flops']:.1f} % |"
        )
    lines += [
        "",
        f"dense matmul peak ({res['peak_dtype']}): {res['peak_flops'] / 1e9:.1f} GFLOP/s",
        f"cached step vs student alone: {100 * res['cached_vs_student']:.0f} %",
        f"speedup vs reference: live {res['speedup_live']:.2f}×, cached {res['speedup_cached']:.2f}×",
    ]
    return "\n".join(lines)
