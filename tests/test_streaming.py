"""Streamed image folders, ImageNet checks, user datasets and the export of CIFAR to PNGs (tests make their images)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CONFIGS, run_kdlab
from kdlab.engine import checkpoint as ck

PIL = pytest.importorskip("PIL.Image")

RECIPE = CONFIGS / "cifar100" / "resnet8.yaml"
FAST = ["train.threads=1", "train.progress=false", "train.batch_size=8", "train.eval_batch_size=16", "--quiet"]


def make_folder(root: Path, n_train: int = 8, n_val: int = 3, classes: int = 3, size: int = 16,
                exts: tuple[str, ...] = ("png", "jpg")) -> Path:  # fmt: skip
    """train/<class>/ and val/<class>/ of small images whose colour depends on the class (learnable)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = size + (i % 3), size + (i % 2) * 4  # not all square, not all the same size
                a = (rng.integers(0, 60, (h, w, 3)) + 90 * c).clip(0, 255).astype(np.uint8)
                PIL.fromarray(a).save(d / f"{i:03d}.{exts[i % len(exts)]}")
    return root


def kdlab(capsys, *args) -> tuple[int, str, str]:
    """``kdlab ARGS`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    from kdlab.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _cfg(**data):
    from kdlab.config import DataConfig

    return DataConfig(**{"name": "imagefolder", "workers": 0, "image_size": 12, **data})


# ---- the data source ---------------------------------------------------------------------------------------------


def test_class_index_is_sorted_folder_names_and_batches_keep_the_contract(tmp_path):
    from kdlab.data import DataSource, build_dataset

    root = make_folder(tmp_path / "f", classes=3)
    (root / "train" / "c1").rename(root / "train" / "a1")  # sorted names: a1, c0, c2
    (root / "val" / "c1").rename(root / "val" / "a1")
    ds = build_dataset(_cfg(root=str(root)))
    noisy = build_dataset(_cfg(root=str(root), label_noise=0.5))
    assert isinstance(ds, DataSource) and isinstance(noisy, DataSource)
    assert len(noisy.noisy_indices) == 12 and torch.equal(noisy.clean_train_y, ds.labels("train"))
    assert all(torch.equal(yb, noisy.labels("train")[idx]) for _, yb, idx in noisy.train_batches(7, seed=0, epoch=1))
    assert (ds.num_classes, ds.num_train, ds.split_size("test"), ds.input_shape) == (3, 24, 9, (3, 12, 12))
    y = ds.labels("train")
    assert y[:8].eq(0).all() and y[8:16].eq(1).all()  # a1 (was c1) is class 0
    seen = []
    for x, yb, idx in ds.train_batches(5, seed=1, epoch=1):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 12, 12)
        assert torch.equal(yb, y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(24))
    assert ds.example_batch(2).shape == (2, 3, 12, 12)


def test_augmentation_is_a_function_of_seed_epoch_index_not_of_workers_or_batching(tmp_path):
    from kdlab.data import build_dataset

    root = make_folder(tmp_path / "f")

    def epoch(workers, bs, seed=3, ep=2):
        ds = build_dataset(_cfg(root=str(root), workers=workers))
        return {int(i): x[k] for x, _, idx in ds.train_batches(bs, seed=seed, epoch=ep) for k, i in enumerate(idx)}

    state = torch.get_rng_state()
    a, b = epoch(0, 5), epoch(2, 7)
    assert all(torch.equal(a[i], b[i]) for i in a)
    assert torch.equal(torch.get_rng_state(), state)  # dropout etc. of a resumed run see the same global stream
    c = epoch(0, 5, ep=3)
    assert sum(not torch.equal(a[i], c[i]) for i in a) > len(a) // 2  # another epoch, other crops


def test_random_resized_crop_box_stays_in_bounds_and_in_range():
    from kdlab.data.images import random_resized_crop_box

    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(1, 300), rng.randint(1, 300)
        left, top, cw, ch = random_resized_crop_box(w, h, rng)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
    boxes = [random_resized_crop_box(400, 300, rng) for _ in range(2000)]
    fracs = np.array([cw * ch / 120000 for _, _, cw, ch in boxes])
    ratios = np.array([cw / ch for _, _, cw, ch in boxes])
    assert fracs.min() >= 0.075 and fracs.max() <= 1.0 and 0.74 <= ratios.min() and ratios.max() <= 1.35


def _source(a: np.ndarray, fmt: str = "PNG", **options):
    """An encoded image opened for rendering (the first two steps of a streamed sample)."""
    import io

    from kdlab.data.decode import DecodeOptions, SourceImage, build_decoder

    buf = io.BytesIO()
    PIL.fromarray(a).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    opts = DecodeOptions(**options)
    return SourceImage(buf.getvalue(), build_decoder(opts.decoder, opts.max_pixels), opts)


def test_imagenet_eval_view_is_resize_256_center_crop_224_scaled():
    from kdlab.data.images import ImagenetTransform

    yy, xx = np.mgrid[0:40, 0:60]
    a = np.stack([xx * 2, yy * 3, (xx + yy) * 2], axis=2).astype(np.uint8)  # smooth: the box corner is snapped to
    # a whole source pixel (up to half a pixel from torchvision's), which moves this ramp by 1-2 levels
    out = ImagenetTransform(size=28).eval(_source(a))
    assert tuple(out.shape) == (28, 28, 3)
    short = round(28 * 256 / 224)  # 32: resize to 48×32, then the centre 28×28 — as one resize of the centre box
    ref = np.asarray(PIL.fromarray(a).resize((48, 32), PIL.Resampling.BILINEAR).crop((10, 2, 38, 30)))
    assert short == 32 and np.abs(out.numpy().astype(int) - ref).mean() < 2.5
    assert tuple(ImagenetTransform().train(_source(a), random.Random(0)).shape) == (224, 224, 3)


# ---- through the CLI -----------------------------------------------------------------------------------------------


def test_train_and_eval_through_the_cli_with_workers(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f")
    out = tmp_path / "run"
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                         "data.workers=2", "train.epochs=2", *FAST, "--out", out)  # fmt: skip
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "imagefolder" and "final_test_top5" in s and s["final_test_top5"] == 100.0
    code, stdout, err = kdlab(capsys, "eval", out, "--json")
    assert code == 0, err
    ev = json.loads(stdout)
    assert ev["n"] == 9 and ev["acc"] == pytest.approx(s["final_test_acc"])


def test_sigkill_then_resume_is_bit_identical_with_two_workers(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=16)
    args = ["train", RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.workers=2",
            "train.epochs=3", "seed=7", *FAST]  # fmt: skip
    ref = tmp_path / "ref"
    assert kdlab(capsys, *args, "--out", ref)[0] == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "kdlab", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not ck.list_checkpoints(out / "checkpoints"):
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = run_kdlab(*args, "--out", out, "--resume")
    assert res.returncode == 0, res.stderr
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert killed and all(torch.equal(a[k], b[k]) for k in a)


def test_symlink_loops_are_followed_once_and_each_file_counted_once(tmp_path, capsys):
    from kdlab.data import build_dataset

    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    ref = build_dataset(_cfg(root=str(root)))
    c0 = root / "train" / "c0"
    os.symlink(".", c0 / "loop")  # train/c0/loop -> train/c0: would multiply the class
    os.symlink("..", c0 / "up")  # train/c0/up -> train/: would pull in every class again
    os.symlink("../c1", root / "train" / "c2" / "other")  # a class folder reached from another class
    os.symlink("000.png", c0 / "same.png")  # the same file under a second name
    (c0 / "deep").mkdir()
    os.symlink("../deep", c0 / "deep" / "again")  # a second loop, one level down
    ds = build_dataset(_cfg(root=str(root)))
    assert ds.num_train == ref.num_train == 12 and torch.equal(ds.labels("train"), ref.labels("train"))
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=imagefolder", f"data.root={root}", "--dry-run",
                         "--out", tmp_path / "dry")
    assert code == 0, err


def test_a_fifo_is_refused_naming_it_or_skipped_and_counted(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    os.mkfifo(root / "train" / "c2" / "zzz.png")  # a read would block forever
    base = ["train", RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.workers=1",
            "train.epochs=1", *FAST]  # fmt: skip
    code, _, err = kdlab(capsys, *base, "--out", tmp_path / "a")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "zzz.png is a FIFO (named pipe), not a regular file" in err and not (tmp_path / "a").exists()
    code, _, err = kdlab(capsys, *base, "data.skip_bad_images=true", "--out", tmp_path / "b")
    assert code == 0, err
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": 1, "test": 0} and "zzz.png" in err


def test_skip_bad_images_covers_the_first_image_read_at_start_up(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    (root / "train" / "c0" / "000.png").write_bytes(b"broken")  # the first sorted training image
    base = ["train", RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=16", "data.workers=1",
            "train.epochs=1", *FAST]  # fmt: skip
    code, _, err = kdlab(capsys, *base, "--out", tmp_path / "a")
    assert code == 2 and "000.png" in err and "skip_bad_images" in err
    code, _, err = kdlab(capsys, *base, "data.skip_bad_images=true", "--out", tmp_path / "b")
    assert code == 0, err
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["skipped_images"]["train"] == 1


def test_workers_render_the_strong_view_beside_the_training_view(tmp_path):
    from kdlab.data import build_dataset

    ds = build_dataset(_cfg(root=str(make_folder(tmp_path / "f")), workers=1))
    ds.prepare_views(2)
    for x, _, idx in ds.train_batches(5, seed=2, epoch=3):
        strong = ds.strong_batch(idx, 2, 3)  # what the worker rendered with the batch
        here = ds.finish(ds._strong_here(idx, 2, 3))  # rendered again in this process
        assert strong.shape == x.shape and torch.equal(strong, here) and not torch.equal(strong, x)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _teacher(tmp_path: Path, classes: int) -> Path:
    from kdlab.models import build

    path = tmp_path / f"teacher{classes}.safetensors"
    save_file(build("resnet8", num_classes=classes).state_dict(), str(path))
    return path


BAD_CASES = {
    "corrupt image": (lambda r: (r / "train" / "c1" / "001.jpg").write_bytes(b"not a jpeg at all"), "001.jpg"),
    "truncated image": (lambda r: (r / "val" / "c0" / "000.png").write_bytes((r / "val" / "c0" / "000.png")
                                                                             .read_bytes()[:60]), "000.png"),
    "empty class folder": (lambda r: [p.unlink() for p in (r / "train" / "c2").iterdir()], "holds no images"),
    "val classes differ": (lambda r: (r / "val" / "c2").rename(r / "val" / "c9"), "differ from train"),
    "not 1000 classes": (lambda r: None, "expected 1000"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_image_folders_are_one_line_errors_and_leave_runs_alone(tmp_path, case, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    spoil, needle = BAD_CASES[case]
    spoil(root)
    name = "imagenet" if case == "not 1000 classes" else "imagefolder"
    out = tmp_path / "run"
    code, _, err = kdlab(capsys, "train", RECIPE, f"data.name={name}", f"data.root={root}", "data.image_size=16",
                         "data.workers=1", "train.epochs=1", *FAST, "--out", out)  # fmt: skip
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: ") and needle in lines[0], err
    if case in ("empty class folder", "val classes differ", "not 1000 classes"):
        assert not out.exists()  # found before anything was written


def test_skip_bad_images_skips_and_counts(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    (root / "train" / "c1" / "001.jpg").write_bytes(b"garbage")
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
                         "data.workers=0", "data.skip_bad_images=true", "train.epochs=2", *FAST,
                         "--out", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "skipped" in line]
    assert len(warnings) == 1 and "001.jpg" in warnings[0]  # once per file, not once per epoch
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["skipped_images"] == {"train": 1, "test": 0}


def test_teacher_with_another_class_count_is_refused(tmp_path, capsys, one_thread):
    root = make_folder(tmp_path / "f", n_train=4, n_val=2)
    code, _, err = kdlab(capsys, "distill", CONFIGS / "cifar100" / "kd_resnet32x4_resnet8x4.yaml",
                         "teacher.name=resnet8", f"teacher.checkpoint={_teacher(tmp_path, 5)}", "model.name=resnet8",
                         "data.name=imagefolder", f"data.root={root}", "data.image_size=16", "train.epochs=1", *FAST,
                         "--out", tmp_path / "r")  # fmt: skip
    assert code == 2 and not (tmp_path / "r").exists()
    assert len(err.strip().splitlines()) == 1 and "5" in err and "3" in err, err


# ---- user datasets ---------------------------------------------------------------------------------------------------

USER = '''
import os
import torch

def tensors(cfg):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 3, 8, 8, generator=g) + y[:, None, None, None]
    return {"train": (x[:48], y[:48]), "test": (x[48:], y[48:]), "num_classes": 3}

class Logged(torch.utils.data.Dataset):
    def __init__(self, n, log=None):
        self.n, self.log = n, log
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        if self.log and torch.utils.data.get_worker_info() is not None:  # reads of the training loop only
            with open(f"{self.log}.{os.environ.get('RANK', '0')}", "a") as f:
                f.write(f"{i}\\n")
        return torch.full((3, 8, 8), float(i % 3)), i % 3

def streamed(cfg):
    return {"train": Logged(48, cfg.root), "test": Logged(12), "num_classes": 3}
'''


def test_user_dataset_needs_trust_then_trains_from_tensors_and_from_a_dataset(tmp_path, capsys, monkeypatch,
                                                                              one_thread):  # fmt: skip
    from kdlab.data import Dataset, build_dataset
    from kdlab.trust import TRUST_ENV, set_trust

    monkeypatch.setenv(TRUST_ENV, "0")  # --trust-code below sets it for this process; restored afterwards
    mod = _write(tmp_path / "mydata.py", USER)
    base = ["train", RECIPE, "train.epochs=1", *FAST]
    code, _, err = kdlab(capsys, *base, f"data.name={mod}:tensors", "--out", tmp_path / "a")
    assert code == 2 and "--trust-code" in err and not (tmp_path / "a").exists()
    try:
        code, _, err = kdlab(capsys, *base, f"data.name={mod}:tensors", "--out", tmp_path / "a", "--trust-code")
        assert code == 0, err
        code, _, err = kdlab(capsys, *base, f"data.name={mod}:streamed", f"data.root={tmp_path / 'seen'}",
                             "data.workers=1", "--out", tmp_path / "b", "--trust-code")  # fmt: skip
        assert code == 0, err
        assert isinstance(build_dataset(_cfg(name=f"{mod}:tensors")), Dataset)  # tensors stay resident
        assert len(Path(f"{tmp_path / 'seen'}.0").read_text().split()) == 48  # one epoch, read in the worker
    finally:
        set_trust(None)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["final_test_acc"] >= 0


@pytest.mark.slow
def test_torchrun_two_processes_see_every_sample_once_per_epoch(tmp_path):
    from test_distributed import _torchrun

    mod = _write(tmp_path / "mydata.py", USER)
    seen = tmp_path / "seen"
    res = _torchrun("train", str(RECIPE), f"data.name={mod}:streamed", f"data.root={seen}", "data.workers=1",
                    "train.epochs=1", "train.batch_size=8", "train.threads=1", "train.progress=false", "--quiet",
                    "--trust-code", "--out", str(tmp_path / "ddp"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    per_rank = [[int(v) for v in Path(f"{seen}.{r}").read_text().split()] for r in (0, 1)]
    assert [len(r) for r in per_rank] == [24, 24]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


# ---- CIFAR as PNGs, config without a data import --------------------------------------------------------------------


def test_export_images_round_trips_cifar_pixels_and_labels(tmp_path, capsys):
    from kdlab.data import build_dataset

    rng = np.random.default_rng(1)
    src = tmp_path / "c"
    src.mkdir()
    for split, n in (("train", 12), ("test", 5)):
        np.savez(src / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 fine_labels=np.arange(n) % 4)  # fmt: skip
    assert kdlab(capsys, "export-images", src, "--out", tmp_path / "png")[0] == 0
    assert kdlab(capsys, "export-images", src, "--out", tmp_path / "png")[0] == 2  # never overwritten
    ds = build_dataset(_cfg(root=str(tmp_path / "png"), transform="cifar", image_size=None))
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 4
    with np.load(src / "train.npz") as z:
        images, labels = z["images"], z["fine_labels"]
    items = ds.sources["train"]
    for i in range(len(items)):
        x, y = items.load(i, None)
        j = int(Path(items.paths[i]).stem)
        assert y == labels[j] and np.array_equal(x.permute(1, 2, 0).numpy(), images[j])


def test_config_does_not_import_data():
    code = "import sys, kdlab.config; assert 'kdlab.data' not in sys.modules, 'config imports data'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert res.returncode == 0, res.stderr


def test_teacher_cache_replays_streamed_random_resized_crop_views_exactly(tmp_path, one_thread):
    """A float32 cache with one view per epoch replays, for every training batch of the live run, the teacher's
    outputs on exactly that batch's views, and a run on it ends where the live run ends. (Bit for bit is not on
    offer: oneDNN's convolution of a sample depends, in the last bit, on the batch around it.)"""
    from kdlab.config import load_config
    from kdlab.engine.teacher_cache import TeacherCache, build_cache
    from kdlab.engine.trainer import Trainer, run

    root = make_folder(tmp_path / "f", n_train=6, n_val=2)
    base = {"data": {"name": "imagefolder", "root": str(root), "image_size": 16, "workers": 1},
            "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": str(_teacher(tmp_path, 3))},
            "method": {"name": "kd"}, "schedule": {"name": "constant"},
            "train": {"epochs": 2, "batch_size": 8, "progress": False, "threads": 1}}  # fmt: skip
    live = Trainer(load_config(None, [], base=base), tmp_path / "live")
    cache = tmp_path / "c.safetensors"
    build_cache(live.teacher, live.data, views=2, out=cache, augment_seed=0, dtype=torch.float32, batch_size=64)
    replay = TeacherCache(cache)
    for epoch in (1, 2):
        for x, _, idx in live.data.train_batches(8, seed=0, epoch=epoch, augment_seed=0, augment_epoch=epoch):
            cached = replay.outputs(epoch, idx).logits
            assert torch.allclose(cached, live._teacher_forward(x).logits, rtol=0, atol=1e-5)
    live.run()
    run(load_config(None, [f"teacher.cache={cache}"], base=base), tmp_path / "cached")
    a, b = load_file(tmp_path / "live" / "model.safetensors"), load_file(tmp_path / "cached" / "model.safetensors")
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5) for k in a)


def test_batches_received_from_workers_are_unmapped_as_they_are_dropped(tmp_path):
    """torch keeps up to 128 received shared-memory batches mapped; a streamed epoch must not hold on to them."""
    from torch.multiprocessing import reductions

    from kdlab.data import build_dataset

    ds = build_dataset(_cfg(root=str(make_folder(tmp_path / "f", n_train=10)), workers=1))
    held = [len(reductions.shared_cache) for _ in ds.train_batches(1, seed=0, epoch=1)]
    assert len(held) == 30 and max(held) <= 8, held  # the batches in flight (prefetch), not all 30


def test_max_samples_keep_the_first_samples_of_streamed_and_resident_data(tmp_path):
    from kdlab.data import build_dataset

    root = make_folder(tmp_path / "imgs", n_train=4, n_val=2, classes=3)
    full = build_dataset(_cfg(root=str(root)))
    small = build_dataset(_cfg(root=str(root), max_train_samples=5, max_test_samples=2))
    assert (small.num_train, small.split_size("test")) == (5, 2)
    assert torch.equal(small.labels("train"), full.labels("train")[:5])
    batches = list(small.train_batches(4, seed=0, epoch=1))
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(5))
    (x, y, idx), = list(small.eval_batches("test", 8))
    assert idx.tolist() == [0, 1] and torch.equal(y, full.labels("test")[:2])

    from kdlab.config import DataConfig

    res = build_dataset(DataConfig(name="synthetic", num_samples=200, max_train_samples=30, max_test_samples=7))
    ref = build_dataset(DataConfig(name="synthetic", num_samples=200))
    assert (res.num_train, res.split_size("test")) == (30, 7)
    assert torch.equal(res.labels("train"), ref.labels("train")[:30])
