"""``kdlab bench --suite data``: images/s of ImageNet-style input pipelines on the same JPEGs with the same workers.

Three pipelines, each a pass over the same training images (``--images``, default 500 generated 500×375 JPEGs —
ImageNet's typical size — or the training images of ``--root``) with ``--workers`` DataLoader workers, interleaved
over ``--rounds``; a pipeline's rate is the median of its rounds:

(a) ``reference`` — written the way torchvision's ``ImageFolder`` + ``RandomResizedCrop(224)`` +
    ``RandomHorizontalFlip`` + ``ToTensor`` + ``Normalize`` works (torchvision itself is never installed): per sample
    ``open`` + ``Image.open`` + ``convert("RGB")`` (full decode), the crop parameters from torch's generator, ``crop``
    then ``resize`` (bilinear), ``transpose``, an HWC → CHW float32 copy divided by 255, a cloned ``sub_``/``div_``
    normalisation, and the DataLoader's default collate (float32 batches);
(b) ``folder`` — kdlab's image-folder path (``data.name=imagefolder``): reduced-scale decode, one antialiased
    resize of the crop box, uint8 channels-last batches, timed as they arrive on the training device (the
    normalisation to float is the device's work — on a GPU it costs the CPU nothing; its cost on this CPU is in the
    breakdown);
(c) ``webdataset`` — kdlab's WebDataset path on the same images exported as shards.

The evaluation transform (resize 256 + centre crop 224, no augmentation) is timed the same way for all three. A
pass's rate is counted from its first batch to its last (worker start-up excluded: it is paid once per run, not per
image). The breakdown times each stage in this process, one image at a time (decode, resize, conversion, collate),
and the main process's CPU time per image during the passes (receiving batches, normalising: what the training
process pays).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdlab.data.images import IMAGENET_MEAN, IMAGENET_STD

PIPELINES = ("reference", "folder", "webdataset")
DESCRIPTIONS = {
    "reference": "(a) reference: torchvision-style ImageFolder, full decode, float32",
    "folder": "(b) kdlab image folder, uint8",
    "webdataset": "(c) kdlab WebDataset shards, uint8",
}
DEFAULT_SIZE = (500, 375)
CLASSES = 10


# ---------------------------------------------------------------------------------------------------------------------
# photo-like JPEGs


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """This process on one intra-op thread (as a DataLoader worker is), restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured, photograph-like uint8 H×W×3 image: colour-correlated noise over nine octaves (a 1/f-like spectrum,
    as natural images have), a few soft-edged objects that keep the texture, sensor noise. At 500×375 its JPEG
    (quality 90) is about the size of an ImageNet photograph's (~110 KiB)."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 62)))
    acc = torch.zeros(1, 3, 3, 4)
    for octave in range(9):  # a pyramid: each octave's noise added at its own scale, the sum upsampled once per level
        side = min(2 ** (octave + 2), width)
        size = (max(2, side * height // width), side) if octave < 8 else (height, width)
        acc = torch.nn.functional.interpolate(acc, size=size, mode="bilinear", align_corners=False)
        acc += torch.randn(acc.shape, generator=g) * (0.96**octave)
    img = np.ascontiguousarray(acc[0].permute(1, 2, 0).numpy())
    mix = (rng.normal(size=(3, 3)) * 0.3 + np.eye(3)).astype(np.float32)
    img = img @ mix.T
    img = img / (img.std() + 1e-6) * rng.uniform(30, 50) + rng.uniform(70, 180, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(int(rng.integers(2, 6))):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * width
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[m] = img[m] * 0.7 + rng.uniform(0, 255, size=3).astype(np.float32) * 0.3
    img += rng.normal(0, 3.5, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(root: Path, n: int, size: tuple[int, int] = DEFAULT_SIZE, seed: int = 0,
                      quality: int = 90) -> Path:  # fmt: skip
    """``n`` photo-like JPEGs (``size``, quality ``quality``) as ``root/train/<class>/``; ``val`` links to train."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with one_thread():
        for c in range(CLASSES):
            (root / "train" / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(photo_like(rng, *size)).save(root / "train" / f"c{i % CLASSES}" / f"{i:06d}.jpg",
                                                         quality=quality)  # fmt: skip
    (root / "val").symlink_to("train", target_is_directory=True)
    return root


def link_subset(root: Path, out: Path, n: int, seed: int = 0) -> Path:
    """A folder of symlinks to a seeded random subset of ``n`` training images of the image folder ``root`` (classes
    kept); its ``val`` links to its ``train``."""
    from kdlab.data.folder import class_folders, scan_split

    classes = class_folders(root / "train")
    table, labels = scan_split(root / "train", classes)
    pick = np.sort(np.random.default_rng(seed).permutation(len(table))[: min(n, len(table))])
    for i in pick.tolist():
        path = Path(table[i])
        d = out / "train" / classes[int(labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:08d}{path.suffix.lower()}").symlink_to(path.resolve())
    (out / "val").symlink_to("train", target_is_directory=True)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# (a) the reference


class ReferenceImageFolder(Dataset):
    """torchvision's ``ImageFolder`` with its standard ImageNet train or eval transform, re-implemented with Pillow
    and torch the way torchvision runs it (see the module docstring). Returns ``(image, target)``."""

    def __init__(self, files: list[str], targets: list[int], train: bool, size: int = 224) -> None:
        self.files, self.targets, self.train, self.size = files, targets, train, size

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def load(path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f:  # torchvision.datasets.folder.pil_loader
            img = Image.open(f)
            return img.convert("RGB")

    def random_resized_crop(self, img: Any) -> Any:
        """``RandomResizedCrop.get_params`` (torch draws) + ``F.resized_crop`` on a PIL image."""
        from PIL import Image

        width, height = img.size
        area = height * width
        log_ratio = torch.log(torch.tensor((3 / 4, 4 / 3)))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(0.08, 1.0).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, size=(1,)).item())
                j = int(torch.randint(0, width - w + 1, size=(1,)).item())
                break
        else:  # centre crop fallback
            w, h = width, height
            i, j = 0, 0
        return img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.Resampling.BILINEAR)

    def resize_center_crop(self, img: Any) -> Any:
        """``Resize(256)`` + ``CenterCrop(224)`` (scaled with ``size``)."""
        from PIL import Image

        short = round(self.size * 256 / 224)
        w, h = img.size
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))

    @staticmethod
    def to_normalized_tensor(img: Any) -> torch.Tensor:
        """``ToTensor`` + ``Normalize`` (not in place: cloned)."""
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
        x = x.permute((2, 0, 1)).contiguous().to(dtype=torch.float32).div(255)
        x = x.clone()
        mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype)
        std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype)
        return x.sub_(mean[:, None, None]).div_(std[:, None, None])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        img = self.load(self.files[index])
        if self.train:
            img = self.random_resized_crop(img)
            if torch.rand(1) < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            img = self.resize_center_crop(img)
        return self.to_normalized_tensor(img), self.targets[index]


def _as_delivered(x: torch.Tensor) -> torch.Tensor:
    return x


def _set_one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# timing


def timed_pass(batches: Iterable[Any], count: Callable[[Any], int]) -> dict[str, float]:
    """Iterate one pass: images/s from the first batch to the last, and this process's CPU seconds per image."""
    cpu0 = time.process_time()
    first_t, first_n, n = None, 0, 0
    t = time.perf_counter()
    for batch in batches:
        k = count(batch)
        n += k
        t = time.perf_counter()
        if first_t is None:
            first_t, first_n = t, k
    cpu = time.process_time() - cpu0
    steady = (n - first_n) / (t - first_t) if first_t is not None and t > first_t and n > first_n else 0.0
    return {"images_per_s": steady, "images": n, "main_cpu_ms_per_image": 1e3 * cpu / max(n, 1)}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def stage_breakdown(files: list[str], size: int = 224, k: int = 48) -> dict[str, dict[str, float]]:
    """Milliseconds per image of each stage of the reference and of kdlab's path, timed in this process (one thread,
    as a worker) on the first ``k`` files with the training transform, after one warm-up pass."""
    with one_thread():
        _stages(files[:k], size)  # warm-up: first calls, page cache
        return _stages(files[:k], size)


def _stages(files: list[str], size: int) -> dict[str, dict[str, float]]:
    """One pass; each image goes through the reference's stages and kdlab's back to back (alternating which goes
    first), so that a change of the machine's load touches both sides alike."""
    import random

    from kdlab.data.augment import ImageAugment
    from kdlab.data.decode import DecodeOptions, SourceImage, build_decoder, dct_reduction, resize
    from kdlab.data.images import ImagenetTransform
    from kdlab.data.stream import stack_inputs
    from kdlab.fileio import read_bytes

    ref = ReferenceImageFolder(files, [0] * len(files), train=True, size=size)
    options = DecodeOptions()
    decoder = build_decoder(options.decoder, options.max_pixels)
    transform = ImagenetTransform(size=size)
    stages: dict[str, dict[str, float]] = {"reference": {}, "kdlab": {}}

    def add(side: str, stage: str, dt: float) -> None:
        stages[side][stage] = stages[side].get(stage, 0.0) + 1e3 * dt / len(files)

    def reference(path: str) -> torch.Tensor:
        t0 = time.perf_counter()
        img = ref.load(path)  # as torchvision's pil_loader (the files were checked regular when scanned)
        t1 = time.perf_counter()
        img = ref.random_resized_crop(img)
        t2 = time.perf_counter()
        x = ref.to_normalized_tensor(img)
        add("reference", "read + decode", t1 - t0)
        add("reference", "crop + resize", t2 - t1)
        add("reference", "to float + normalise", time.perf_counter() - t2)
        return x

    def kdlab(i: int, path: str) -> torch.Tensor:
        t0 = time.perf_counter()
        src = SourceImage(read_bytes(path, "image"), decoder, options)
        crop = transform.train_crop(src.width, src.height, random.Random(i))
        t1 = time.perf_counter()
        arr, applied = src.encoded.decode(dct_reduction(crop))
        t2 = time.perf_counter()
        left, top, bw, bh = (int(v / applied + 0.5) for v in crop.box)
        x = resize(arr[top : top + bh, left : left + bw], crop.out, options.max_pixels).permute(2, 0, 1)
        add("kdlab", "read + header + plan", t1 - t0)
        add("kdlab", "decode (reduced scale)", t2 - t1)
        add("kdlab", "crop + resize", time.perf_counter() - t2)
        return x

    torch.manual_seed(0)
    ref_out, our_out = [], []
    for i, path in enumerate(files):
        if i % 2:
            our_out.append(kdlab(i, path))
            ref_out.append(reference(path))
        else:
            ref_out.append(reference(path))
            our_out.append(kdlab(i, path))
    t0 = time.perf_counter()
    torch.utils.data.default_collate([(x, 0) for x in ref_out])
    add("reference", "collate", time.perf_counter() - t0)
    t0 = time.perf_counter()
    batch = stack_inputs(our_out)
    add("kdlab", "collate (uint8)", time.perf_counter() - t0)
    norm = ImageAugment(IMAGENET_MEAN, IMAGENET_STD, num_samples=0, enabled=False)
    t0 = time.perf_counter()
    norm.eval_batch(batch)
    stages["device"] = {"uint8 → normalised float32 (on this CPU)": 1e3 * (time.perf_counter() - t0) / len(files)}
    return {side: {s: round(v, 3) for s, v in d.items()} for side, d in stages.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the suite


def run_data_bench(
    root: str | None = None,
    workers: int = 2,
    images: int = 500,
    rounds: int = 3,
    batch_size: int = 64,
    size: int = 224,
    log: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Time (a), (b), (c) for the train and the eval transform; returns the measurements (see the module doc)."""
    from kdlab.config import DataConfig
    from kdlab.data import build_dataset
    from kdlab.data.export import export_webdataset, folder_sources
    from kdlab.data.folder import class_folders, scan_split

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="kdlab-bench-data-") as tmp:
        tmp_path = Path(tmp)
        if root is None:
            log(f"generating {images} photo-like {DEFAULT_SIZE[0]}×{DEFAULT_SIZE[1]} JPEGs …")
            folder = make_image_folder(tmp_path / "images", images)
            source = f"{images} generated photo-like {DEFAULT_SIZE[0]}×{DEFAULT_SIZE[1]} JPEGs (quality 90)"
        else:
            folder = link_subset(Path(root), tmp_path / "images", images)
            source = f"{images} training images of {root} (a seeded random subset)"
        classes = class_folders(folder / "train")
        table, labels = scan_split(folder / "train", classes)
        n = len(table)
        files, targets = [table[i] for i in range(n)], [int(v) for v in labels]
        sizes = [os.path.getsize(f) for f in files]
        log("exporting them as WebDataset shards …")
        cls, srcs = folder_sources(folder)
        shards = tmp_path / "shards"
        export_webdataset(srcs, cls, shards, shard_size=max(32, n // 8), seed=0)
        common = dict(workers=workers, image_size=size, transform="imagenet")
        folder_ds = build_dataset(DataConfig(name="imagefolder", root=str(folder), **common))
        wds = build_dataset(DataConfig(name="webdataset", root=str(shards), **common))
        for ds in (folder_ds, wds):  # uint8 batches on the device: the normalisation is the device's work
            ds.finish = _as_delivered

        def run(pipeline: str, train: bool, epoch: int) -> dict[str, float]:
            if pipeline == "reference":
                loader = DataLoader(ReferenceImageFolder(files, targets, train, size), batch_size=batch_size,
                                    shuffle=train, num_workers=workers, worker_init_fn=_set_one_thread,
                                    generator=torch.Generator().manual_seed(epoch))  # fmt: skip
                return timed_pass(loader, lambda b: len(b[0]))
            ds = folder_ds if pipeline == "folder" else wds
            it = ds.train_batches(batch_size, seed=0, epoch=epoch) if train else ds.eval_batches("train", batch_size)
            return timed_pass(it, lambda b: len(b[0]))

        measured: dict[str, dict[str, list[dict[str, float]]]] = {"train": {}, "eval": {}}
        for r in range(rounds):
            for mode in ("train", "eval"):
                order = PIPELINES if r % 2 == 0 else tuple(reversed(PIPELINES))  # interleaved, alternating order
                for p in order:
                    res = run(p, mode == "train", r + 1)
                    measured[mode].setdefault(p, []).append(res)
                    log(f"round {r + 1}/{rounds} {mode:5s} {p:10s} {res['images_per_s']:7.1f} images/s")
        breakdown = stage_breakdown(files, size)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: dict[str, Any] = {
        "suite": "data", "source": source, "num_images": n, "image_size": size, "batch_size": batch_size,
        "workers": workers, "rounds": rounds, "mean_file_kib": round(sum(sizes) / len(sizes) / 1024, 1),
        "decoder": type(folder_ds.sources["train"].views.decoder).__name__, "cpu_count": os.cpu_count(),
        "load_average_before": load_before, "load_average_after": load_after, "breakdown_ms_per_image": breakdown,
    }  # fmt: skip
    for mode, suffix in (("train", ""), ("eval", "_eval")):
        for p in PIPELINES:
            rates = [m["images_per_s"] for m in measured[mode][p]]
            out[f"{p}{suffix}_img_s"] = round(_median(rates), 1)
            out[f"{p}{suffix}_rounds_img_s"] = [round(v, 1) for v in rates]
            out[f"{p}{suffix}_main_cpu_ms_per_image"] = round(
                _median([m["main_cpu_ms_per_image"] for m in measured[mode][p]]), 3)
        ref = out[f"reference{suffix}_img_s"]
        for p in ("folder", "webdataset"):
            out[f"{p}{suffix}_vs_reference"] = round(out[f"{p}{suffix}_img_s"] / ref, 2) if ref else None
            # the same round's rates side by side (the load of a shared machine drifts between rounds)
            paired = [a / b for a, b in zip(out[f"{p}{suffix}_rounds_img_s"], out[f"reference{suffix}_rounds_img_s"]) if b]
            out[f"{p}{suffix}_vs_reference_per_round"] = [round(v, 2) for v in paired]
            out[f"{p}{suffix}_vs_reference_paired_median"] = round(_median(paired), 2) if paired else None
    return out


def format_data_report(res: dict[str, Any]) -> str:
    """The measurements as a markdown table and the stage breakdown."""
    load = res.get("load_average_before")
    lines = [
        f"kdlab bench --suite data: {res['source']} (mean {res['mean_file_kib']} KiB), {res['image_size']}² crops, "
        f"batch {res['batch_size']}, {res['workers']} workers, median of {res['rounds']} interleaved rounds"
        + (f", load average {load[0]:.1f}" if load else ""),
        "",
        "| pipeline | train images/s | vs reference | eval images/s | vs reference | main-process CPU ms/image (train) |",
        "|---|---|---|---|---|---|",
    ]
    for p in PIPELINES:
        vs = "1.00×" if p == "reference" else (f"{res[p + '_vs_reference']:.2f}× (per round: "
                                                 f"{res[p + '_vs_reference_paired_median']:.2f}×)")  # fmt: skip
        vs_eval = "1.00×" if p == "reference" else (f"{res[p + '_eval_vs_reference']:.2f}× (per round: "
                                                      f"{res[p + '_eval_vs_reference_paired_median']:.2f}×)")  # fmt: skip
        lines.append(f"| {DESCRIPTIONS[p]} | {res[p + '_img_s']:.0f} | {vs} | {res[p + '_eval_img_s']:.0f} | "
                     f"{vs_eval} | {res[p + '_main_cpu_ms_per_image']:.2f} |")  # fmt: skip
    lines += ["", f"where the time goes (ms per image, one process, training transform; decoder {res['decoder']}):"]
    for side, stages in res["breakdown_ms_per_image"].items():
        total = sum(stages.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        lines.append(f"  {side}: {parts} — total {total:.2f}")
    bytes_ref, bytes_u8 = 4 * 3 * res["image_size"] ** 2, 3 * res["image_size"] ** 2
    lines.append(f"  transfer per image from workers: reference {bytes_ref / 1024:.0f} KiB (float32), kdlab "
                 f"{bytes_u8 / 1024:.0f} KiB (uint8); main-process CPU per image in the table")  # fmt: skip
    return "\n".join(lines)


