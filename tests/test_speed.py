"""Fast path and teacher cache: results unchanged; `kdlab bench` runs (timings are not asserted)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kdlab.bench import PilCifar, format_report, run_bench
from kdlab.cli import main
from kdlab.config import load_config
from kdlab.data import CIFAR100_MEAN, CIFAR100_STD, ImageAugment
from kdlab.engine import Trainer, run
from kdlab.engine import checkpoint as ck
from kdlab.engine.teacher_cache import TeacherCache
from kdlab.errors import KdlabError
from kdlab.models import build

from conftest import CONFIGS, SMALL


def _same_run(a, b):
    ma = [{k: v for k, v in json.loads(x).items() if "time" not in k and "per_s" not in k}
          for x in (a / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    mb = [{k: v for k, v in json.loads(x).items() if "time" not in k and "per_s" not in k}
          for x in (b / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return ma == mb and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cache_with_views_equal_epochs_reproduces_live_run_mnist1d(tmp_path, teacher_run, capsys):
    kd = CONFIGS / "mnist1d" / "student_kd.yaml"
    common = [f"teacher.checkpoint={teacher_run}", *SMALL, "train.epochs=3"]
    cache = tmp_path / "c.safetensors"
    assert main(["cache-teacher", kd, *common, "--views", "3", "--out", cache, "--dtype", "float32"]) == 0
    assert main(["distill", kd, *common, "--out", tmp_path / "live", "--quiet"]) == 0
    assert main(["distill", kd, *common, f"teacher.cache={cache}", "seed=0", "--out", tmp_path / "cached", "--quiet"]) == 0
    assert _same_run(tmp_path / "live", tmp_path / "cached")
    # refuses to overwrite, and a cache for other data is refused with one line
    capsys.readouterr()
    assert main(["cache-teacher", kd, *common, "--views", "3", "--out", cache]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    code = main(["distill", kd, *common, "data.num_samples=500", f"teacher.cache={cache}", "--out", tmp_path / "x", "--quiet"])
    assert code == 2 and "was made for mnist1d with 800 samples" in capsys.readouterr().err


def _tiny_cifar_cfg(tmp_path, *extra):
    teacher = build("resnet8", num_classes=10)
    path = tmp_path / "t.safetensors"
    if not path.exists():
        ck.save_weights(path, teacher.state_dict())
    base = {"data": {"name": "synthetic", "num_samples": 160, "train_split": 0.8, "num_classes": 10},
            "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": str(path)},
            "method": {"name": "kd"}, "schedule": {"name": "constant"},
            "train": {"epochs": 2, "batch_size": 32, "progress": False, "threads": 1}}  # fmt: skip
    return load_config(None, list(extra), base=base)


def test_cache_reproduces_live_run_tiny_cifar_with_augmentation(tmp_path):
    from kdlab.engine.teacher_cache import build_cache

    live = Trainer(_tiny_cifar_cfg(tmp_path), tmp_path / "live")
    cache = tmp_path / "c.safetensors"
    build_cache(live.teacher, live.data, views=2, out=cache, augment_seed=0, dtype=torch.float32, batch_size=64)
    live.run()
    run(_tiny_cifar_cfg(tmp_path, f"teacher.cache={cache}"), tmp_path / "cached")
    assert _same_run(tmp_path / "live", tmp_path / "cached")


def test_fewer_views_replay_matching_augmentation(tmp_path):
    from kdlab.engine.teacher_cache import build_cache

    tr = Trainer(_tiny_cifar_cfg(tmp_path, "train.epochs=5", "seed=7"), tmp_path / "r")
    cache_path = tmp_path / "c.safetensors"
    build_cache(tr.teacher, tr.data, views=2, out=cache_path, augment_seed=3, dtype=torch.float32)
    cache = TeacherCache(cache_path)
    assert [cache.view_of(e) for e in (1, 2, 3, 4, 5)] == [0, 1, 0, 1, 0]
    assert cache.augment_epoch(5) == 1
    # the stored outputs of view v are the teacher on the augmentation of epoch v + 1 (seed 3), for any index set
    idx = torch.tensor([3, 77, 12])
    x = tr.data.transform.train_batch(tr.data.train.x[idx], idx, 3, 2)
    with torch.no_grad():
        direct = tr.teacher(x)
    assert torch.allclose(cache.outputs(4, idx).logits, direct, atol=1e-5)
    # a run replaying the cache takes the cache's augmentation seed; a conflicting explicit seed is refused
    tr2 = Trainer(_tiny_cifar_cfg(tmp_path, "train.epochs=5", f"teacher.cache={cache_path}"), tmp_path / "r2")
    assert tr2.augment_seed == 3
    with pytest.raises(KdlabError, match="augment seed 3"):
        Trainer(_tiny_cifar_cfg(tmp_path, f"teacher.cache={cache_path}", "data.augment_seed=4"), tmp_path / "r3")
    with pytest.raises(KdlabError, match="lacks 'prepool'"):
        cache.check(tr.data, None, ("logits", "prepool"))


def _identify(out: torch.Tensor, padded: torch.Tensor) -> tuple[int, int, int]:
    """Which (dy, dx, flip) produced ``out`` from the zero-padded image."""
    for flip in (0, 1):
        for dy in range(9):
            for dx in range(9):
                crop = padded[:, dy : dy + 32, dx : dx + 32]
                if torch.equal(crop.flip(-1) if flip else crop, out):
                    return dy, dx, flip
    raise AssertionError("output is not a crop of the padded image")


def test_fast_path_and_reference_loop_sample_the_same_augmentation_distribution():
    """Both pipelines draw (dy, dx, flip) uniformly from 9 × 9 × 2 outcomes: chi-square test on each."""
    from scipy.stats import chisquare

    rng = np.random.default_rng(1)
    img = rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)  # non-zero so that padding is recognisable
    chw = torch.from_numpy(img).permute(2, 0, 1)
    padded = torch.nn.functional.pad(chw, (4, 4, 4, 4))
    n = 3000
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=n)
    batch = aug.crop_flip(chw.expand(n, -1, -1, -1).contiguous(), aug.epoch_params(0, 1, n))
    ours = [_identify(batch[i], padded) for i in range(n)]
    ref_ds = PilCifar(img[None].repeat(n, 0), np.zeros(n, dtype=np.int64), CIFAR100_MEAN, CIFAR100_STD)
    torch.manual_seed(0)
    mean, std = torch.tensor(CIFAR100_MEAN).view(3, 1, 1), torch.tensor(CIFAR100_STD).view(3, 1, 1)
    theirs = []
    for i in range(n):
        x, _, _ = ref_ds[i]
        raw = ((x * std + mean) * 255).round().to(torch.uint8)
        theirs.append(_identify(raw, padded))
    for draws in (ours, theirs):
        dy = np.bincount([d[0] for d in draws], minlength=9)
        dx = np.bincount([d[1] for d in draws], minlength=9)
        fl = np.bincount([d[2] for d in draws], minlength=2)
        assert chisquare(dy).pvalue > 1e-3 and chisquare(dx).pvalue > 1e-3 and chisquare(fl).pvalue > 1e-3
    # and the normalised outputs agree exactly for the same (dy, dx, flip)
    x_ref, _, _ = ref_ds[0]
    dy, dx, fl = _identify(((x_ref * std + mean) * 255).round().to(torch.uint8), padded)
    from kdlab.data.augment import AugmentParams

    p = AugmentParams(torch.tensor([dy]), torch.tensor([dx]), torch.tensor([bool(fl)]))
    assert torch.allclose(aug.normalize(aug.crop_flip(chw[None], p))[0], x_ref, atol=1e-6)


def test_bench_small_runs_and_reports(capsys):
    res = run_bench("resnet8", "resnet8", device="cpu", images=128, batch_size=64, workers=1, rounds=1,
                    log=lambda m: None)  # fmt: skip
    assert [r["mode"] for r in res["rows"]] == ["reference", "live", "cached", "student", "live-bf16"]
    assert all(r["images_per_s"] > 0 and 0 < r["peak_fraction"] for r in res["rows"])
    assert res["peak_flops"]["float32"] > 0 and res["bf16_gain"] > 0
    assert abs(res["speedup_cached"] - res["rows"][2]["images_per_s"] / res["rows"][0]["images_per_s"]) < 1e-9
    text = format_report(res)
    assert "(a) reference: mdistiller loop, fp32" in text and "bf16 gain" in text
    assert text.splitlines()[-1].startswith("speedup vs reference: live ") and text.endswith("×)")
    assert all(r["best_images_per_s"] >= r["images_per_s"] for r in res["rows"])  # median of the rounds ≤ best
