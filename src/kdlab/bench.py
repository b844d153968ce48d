"""``kdlab bench``: distillation throughput of kdlab against the training loop users would otherwise run.

Modes, each timed on a warm epoch of the same CIFAR-shaped synthetic data (uint8 3×32×32, random labels), interleaved
over ``rounds``; the headline rate of a mode is the median of its rounds (the best round is reported beside it):

(a) ``reference`` — the structure of mdistiller's training loop (``mdistiller/engine/trainer.py``, ``utils.py``,
    ``dataset/cifar100.py``): a ``DataLoader`` with 2 workers over a dataset that makes a PIL image of each sample and
    applies torchvision's ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize`` one
    image at a time (re-implemented here with Pillow + numpy, torchvision not being a dependency); a distiller module
    with the teacher forward every step; per step ``zero_grad``, forward, ``sum(l.mean())``, backward, SGD step, top-1/5
    accuracy, ``loss.cpu()``, average meters and the progress-bar text; ``cudnn.benchmark``; float32. Worker
    start-up is outside the timed epoch (persistent workers, one warm-up epoch);
(b) ``live`` — kdlab's training step (:class:`kdlab.engine.Trainer`), float32 like (a): data resident on the
    device, batched augmentation there, inference-mode teacher;
(c) ``cached`` — the same with a teacher-output cache (no teacher forward);
(d) ``student`` — the student alone (cross-entropy), the upper bound for (c);
(e) ``live-bf16`` — (b) under bf16 autocast with a bf16 copy of the teacher: the precision gain as its own row.

It also measures the machine's dense matmul FLOP/s and reports each mode's model FLOP/s against it, and the peak
memory of each mode.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from kdlab import losses

# the normalisation constants of mdistiller's CIFAR-100 transforms
MDISTILLER_MEAN = (0.5071, 0.4867, 0.4408)
MDISTILLER_STD = (0.2675, 0.2565, 0.2761)
MODES = ("reference", "live", "cached", "student", "live-bf16")
DESCRIPTIONS = {
    "reference": "(a) reference: mdistiller loop, fp32", "live": "(b) kdlab live teacher, fp32",
    "cached": "(c) kdlab teacher cache, fp32", "student": "(d) student alone, fp32",
    "live-bf16": "(e) kdlab live teacher, bf16 autocast",
}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# (a) the reference loop


class PilCifar(torch.utils.data.Dataset):
    """mdistiller's ``CIFAR100Instance`` with torchvision's CIFAR train transform, per sample on a PIL image.

    Same operations and random draws as torchvision: zero-pad by 4 (``ImageOps.expand``), crop offsets from
    ``torch.randint``, flip if ``torch.rand(1) < 0.5``, ``ToTensor`` (``np.array`` copy → CHW float / 255),
    ``Normalize`` (clone, per-call mean/std tensors, ``sub_``/``div_``). Returns ``(image, target, index)``.
    """

    def __init__(
        self, images_hwc: np.ndarray, labels: np.ndarray,
        mean: tuple[float, ...] = MDISTILLER_MEAN, std: tuple[float, ...] = MDISTILLER_STD,
    ) -> None:  # fmt: skip
        self.images, self.labels = images_hwc, labels
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.images)

    def _transform(self, img):  # noqa: ANN001, ANN202 (a PIL image)
        from PIL import Image, ImageOps

        img = ImageOps.expand(img, border=4, fill=0)  # RandomCrop(32, padding=4)
        top = int(torch.randint(0, img.height - 32 + 1, size=(1,)).item())
        left = int(torch.randint(0, img.width - 32 + 1, size=(1,)).item())
        img = img.crop((left, top, left + 32, top + 32))
        if torch.rand(1) < 0.5:  # RandomHorizontalFlip
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor
        x = x.view(img.size[1], img.size[0], len(img.getbands())).permute(2, 0, 1).contiguous()
        x = x.to(torch.get_default_dtype()).div(255)
        x = x.clone()  # Normalize (not in place)
        mean = torch.as_tensor(self.mean, dtype=x.dtype)
        std = torch.as_tensor(self.std, dtype=x.dtype)
        if (std == 0).any():
            raise ValueError("std evaluated to zero")
        return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        from PIL import Image

        img, target = Image.fromarray(self.images[index]), int(self.labels[index])
        return self._transform(img), target, index


class _Distiller(nn.Module):
    """mdistiller's ``KD`` distiller: the teacher stays in eval mode; forward returns logits and weighted losses."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 4.0) -> None:
        super().__init__()
        self.student, self.teacher, self.temperature = student, teacher, temperature

    def train(self, mode: bool = True) -> _Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits_student = self.student(image)
        with torch.no_grad():
            logits_teacher = self.teacher(image)
        loss_ce = 0.1 * F.cross_entropy(logits_student, target)
        loss_kd = 0.9 * losses.kd(logits_student, logits_teacher, temperature=self.temperature)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_kd}


@dataclass
class _Average:
    """mdistiller's ``AverageMeter`` (values may be tensors, as its top-1/top-5 are)."""

    sum: float | torch.Tensor = 0.0
    count: int = 0
    avg: float | torch.Tensor = 0.0

    def update(self, val: float | torch.Tensor, n: int = 1) -> None:
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    with torch.no_grad():
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target.reshape(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / len(target)) for k in topk]


class ReferenceLoop:
    """mdistiller's ``BaseTrainer.train_epoch`` / ``train_iter`` for KD, on one device."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, images_hwc: np.ndarray, labels: np.ndarray,
        device: torch.device, batch_size: int = 64, workers: int = 2,
    ) -> None:  # fmt: skip
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.device = device
        self.loader = torch.utils.data.DataLoader(
            PilCifar(images_hwc, labels), batch_size=batch_size, shuffle=True, num_workers=workers,
            persistent_workers=workers > 0,  # worker start-up once, outside the timed epochs
        )  # fmt: skip
        distiller = _Distiller(student.to(device), teacher.to(device))
        self.distiller: nn.Module = nn.DataParallel(distiller) if device.type == "cuda" else distiller
        self.optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        self._bar_file = open(os.devnull, "w")  # noqa: SIM115 (the bar's text is rendered, then discarded)

    def epoch(self, epoch: int) -> int:
        """One training epoch; returns the number of images."""
        from tqdm import tqdm

        meters = {k: _Average() for k in ("training_time", "data_time", "losses", "top1", "top5")}
        pbar = tqdm(range(len(self.loader)), file=self._bar_file)
        self.distiller.train()
        n = 0
        for data in self.loader:
            msg = self._iter(data, epoch, meters)
            pbar.set_description(f"\033[32m[TRAIN] {msg}\033[0m")
            pbar.update()
            n += len(data[1])
        pbar.close()
        return n

    def _iter(self, data: list[torch.Tensor], epoch: int, meters: dict[str, _Average]) -> str:
        self.optimizer.zero_grad()
        t0 = time.time()
        image, target, index = data
        meters["data_time"].update(time.time() - t0)
        image = image.float().to(self.device, non_blocking=True)
        target = target.to(self.device, non_blocking=True)
        index = index.to(self.device, non_blocking=True)
        preds, losses_dict = self.distiller(image=image, target=target)
        loss = sum(v.mean() for v in losses_dict.values())
        loss.backward()  # type: ignore[union-attr]
        self.optimizer.step()
        meters["training_time"].update(time.time() - t0)
        bs = image.size(0)
        acc1, acc5 = _accuracy(preds, target)
        meters["losses"].update(loss.cpu().detach().numpy().mean(), bs)  # type: ignore[union-attr]
        meters["top1"].update(acc1[0], bs)
        meters["top5"].update(acc5[0], bs)
        m = meters
        return (f"Epoch:{epoch}| Time(data):{m['data_time'].avg:.3f}| Time(train):{m['training_time'].avg:.3f}| "
                f"Loss:{m['losses'].avg:.4f}| Top-1:{m['top1'].avg:.3f}| Top-5:{m['top5'].avg:.3f}")  # fmt: skip

    def close(self) -> None:
        self._bar_file.close()
        del self.loader  # ends the persistent workers


# --------------------------------------------------------------------------------------------------------------------
# machine, model FLOPs, memory


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


def _rss_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak(device: torch.device) -> bool:
    """Start a peak-memory window; False where the platform cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return True


def _peak_mib(device: torch.device, started: bool) -> float | None:
    """CUDA: peak allocated memory; CPU: this process's peak RSS in the window (every mode lives in the process)."""
    if not started:
        return None
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _rss_kib("VmHWM")
    return None if hwm is None else hwm / 1024


# --------------------------------------------------------------------------------------------------------------------
# (b)-(e) kdlab's engine


def _trainer(student: str, teacher: str | None, n: int, batch: int, device: str, tmp: Path, extra: list[str]):
    from kdlab.config import load_config
    from kdlab.engine import Trainer

    base = {
        "data": {"name": "synthetic", "num_samples": n + 100, "train_split": n / (n + 100), "num_classes": 100},
        "model": {"name": student},
        "method": {"name": "ce"} if teacher is None else {"name": "kd", "temperature": 4.0},
        "train": {"epochs": 100, "batch_size": batch, "progress": False, "device": device},
        "schedule": {"name": "constant"},
    }  # fmt: skip
    if teacher is not None:
        base["teacher"] = {"name": teacher, "checkpoint": str(tmp / "teacher.safetensors")}
    cfg = load_config(None, extra, base=base)
    return Trainer(cfg, tmp / f"run-{len(list(tmp.iterdir()))}")


@dataclass
class _Mode:
    name: str
    epoch: Callable[[int], int]  # runs one epoch, returns its number of images
    flop_per_image: float
    peak_dtype: torch.dtype = torch.float32
    rates: list[float] = field(default_factory=list)
    peak_mib: list[float] = field(default_factory=list)


def _timed(mode: _Mode, epoch: int, device: torch.device) -> None:
    base = _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    n = mode.epoch(epoch)
    _sync(device)
    mode.rates.append(n / (time.perf_counter() - t0))
    peak = _peak_mib(device, base)
    if peak is not None:
        mode.peak_mib.append(peak)


def run_bench(
    teacher: str | None = None, student: str | None = None, device: str = "auto", images: int | None = None,
    batch_size: int = 64, compile: bool = False, workers: int = 2, rounds: int = 5, bf16: bool = True,
    log: Callable[[str], None] = print,
) -> dict:  # fmt: skip
    """Measure every mode (warm-up epoch, then ``rounds`` interleaved timed epochs); returns rows and ratios."""
    from kdlab.engine import checkpoint as ck
    from kdlab.engine.atomic import sha256_file
    from kdlab.engine.objective import select_device
    from kdlab.engine.teacher_cache import build_cache
    from kdlab.models import build

    dev = select_device(device)
    cuda = dev.type == "cuda"
    teacher = teacher or ("resnet32x4" if cuda else "resnet20")
    student = student or ("resnet8x4" if cuda else "resnet8")
    images = images or (20000 if cuda else 1024)
    extra = ["train.amp=none", f"train.compile={str(compile).lower()}"]
    torch.manual_seed(0)
    t_model, s_model = build(teacher), build(student)
    t_flops, s_flops = forward_flops(t_model), forward_flops(s_model)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, size=images)
    live_flops, student_flops = t_flops + 3 * s_flops, 3 * s_flops  # forward + backward ≈ 3 forwards
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        ck.save_weights(tmp / "teacher.safetensors", t_model.state_dict())
        log(f"[bench] {teacher} → {student}, {images} images, batch {batch_size}, device {dev}, {rounds} rounds")
        ref_t, ref_s = build(teacher), build(student)
        ref_t.load_state_dict(t_model.state_dict())
        ref = ReferenceLoop(ref_t, ref_s, imgs, labels, dev, batch_size, workers)
        live = _trainer(student, teacher, images, batch_size, device, tmp, extra)
        cache_path = tmp / "cache.safetensors"
        build_cache(live.teacher, live.data, views=2, out=cache_path,  # type: ignore[arg-type]
                    augment_seed=live.augment_seed, fast=live.fast,
                    meta={"teacher_sha256": sha256_file(tmp / "teacher.safetensors")})  # fmt: skip
        cached = _trainer(student, teacher, images, batch_size, device, tmp, extra + [f"teacher.cache={cache_path}"])
        alone = _trainer(student, None, images, batch_size, device, tmp, extra)
        modes = [
            _Mode("reference", ref.epoch, live_flops),
            _Mode("live", lambda e: _epoch(live, e), live_flops),
            _Mode("cached", lambda e: _epoch(cached, e), student_flops),
            _Mode("student", lambda e: _epoch(alone, e), student_flops),
        ]
        if bf16:
            half = _trainer(student, teacher, images, batch_size, device, tmp,
                            ["train.amp=bf16", f"train.compile={str(compile).lower()}"])  # fmt: skip
            modes.append(_Mode("live-bf16", lambda e: _epoch(half, e), live_flops, torch.bfloat16))
        try:
            for m in modes:  # warm-up epoch (workers started, compiled, caches filled)
                t0 = time.perf_counter()
                m.epoch(1)
                log(f"[bench] warm-up {m.name}: {time.perf_counter() - t0:.1f} s")
            for r in range(rounds):
                for m in modes:
                    _timed(m, 2 + r, dev)
                log("[bench] round {}: ".format(r + 1) + ", ".join(f"{m.name} {m.rates[-1]:.0f}" for m in modes))
        finally:
            ref.close()
    peaks = {torch.float32: matmul_flops(dev, torch.float32)}
    if bf16:
        peaks[torch.bfloat16] = matmul_flops(dev, torch.bfloat16)
    # headline: the median of each mode's interleaved rounds (the reference's rate moves ±8 % between rounds with its
    # workers' contention for the cores, so its best round is an outlier more often than kdlab's); best rounds kept too
    med = {m.name: statistics.median(m.rates) for m in modes}
    best = {m.name: max(m.rates) for m in modes}
    rows = [
        {"mode": m.name, "images_per_s": med[m.name], "best_images_per_s": best[m.name], "all_images_per_s": m.rates,
         "vs_reference": med[m.name] / med["reference"], "best_vs_reference": best[m.name] / best["reference"],
         "model_flops": med[m.name] * m.flop_per_image,
         "peak_fraction": med[m.name] * m.flop_per_image / peaks[m.peak_dtype],
         "peak_dtype": str(m.peak_dtype).replace("torch.", ""),
         "peak_mem_mib": max(m.peak_mib) if m.peak_mib else None}
        for m in modes
    ]  # fmt: skip
    return {
        "teacher": teacher, "student": student, "device": str(dev), "images": images, "batch_size": batch_size,
        "compile": compile, "rounds": rounds, "workers": workers,
        "peak_flops": {str(k).replace("torch.", ""): v for k, v in peaks.items()},
        "rows": rows,
        "speedup_live": med["live"] / med["reference"],
        "speedup_cached": med["cached"] / med["reference"],
        "cached_vs_student": med["cached"] / med["student"],
        "best_speedup_live": best["live"] / best["reference"],
        "best_speedup_cached": best["cached"] / best["reference"],
        "best_cached_vs_student": best["cached"] / best["student"],
        "bf16_gain": med["live-bf16"] / med["live"] if bf16 else None,
        "teacher_gflop_per_image": t_flops / 1e9, "student_gflop_per_image": s_flops / 1e9,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }  # fmt: skip


def _epoch(trainer, epoch: int) -> int:  # noqa: ANN001
    trainer.train_epoch(epoch)
    return trainer.data.num_train


def format_report(res: dict) -> str:
    load = res.get("load_average")
    lines = [
        f"kdlab bench: {res['teacher']} → {res['student']} on {res['device']}, {res['images']} CIFAR-shaped images, "
        f"batch {res['batch_size']}, compile {res['compile']}, {res['rounds']} interleaved warm epochs per mode"
        + (f", load average {load[0]:.1f}" if load else ""),
        f"forward GFLOP/image: teacher {res['teacher_gflop_per_image']:.4f}, student {res['student_gflop_per_image']:.4f}",
        "",
        "| mode | images/s (median) | vs reference | best round | best vs best | model GFLOP/s | % of matmul peak "
        "| peak mem MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        mem = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        lines.append(
            f"| {DESCRIPTIONS[r['mode']]} | {r['images_per_s']:.0f} | {r['vs_reference']:.2f}× | "
            f"{r['best_images_per_s']:.0f} | {r['best_vs_reference']:.2f}× | {r['model_flops'] / 1e9:.1f} | "
            f"{100 * r['peak_fraction']:.1f} % ({r['peak_dtype']}) | {mem} |"
        )
    peaks = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in res["peak_flops"].items())
    mem_note = ("peak allocated CUDA memory" if res["device"].startswith("cuda")
                else "peak RSS of the bench process during the epoch (all modes' models and data live in it; the "
                "reference's worker processes not counted)")  # fmt: skip
    lines += [
        "",
        f"dense matmul peak GFLOP/s: {peaks}; model FLOPs = teacher forward + 3 × student forward per image",
        f"peak mem: {mem_note}",
        f"cached step vs student alone: {100 * res['cached_vs_student']:.0f} % "
        f"(best rounds: {100 * res['best_cached_vs_student']:.0f} %)",
    ]
    if res.get("bf16_gain") is not None:
        lines.append(f"bf16 gain (live bf16 / live fp32): {res['bf16_gain']:.2f}×")
    lines.append(f"speedup vs reference: live {res['speedup_live']:.2f}×, cached {res['speedup_cached']:.2f}× "
                 f"(medians of {res['rounds']} rounds; best round against best round: live "
                 f"{res['best_speedup_live']:.2f}×, cached {res['best_speedup_cached']:.2f}×)")  # fmt: skip
    return "\n".join(lines)
