"""The compressed (top-k + quantised rest) teacher cache for many classes, and ``kdlab cache-teacher`` with it."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F

from conftest import write_yaml
from kdlab.engine.teacher_cache import TeacherCache, compress_logits, decompress_logits


def _imagenet_like(n: int = 256, k: int = 1000, seed: int = 0) -> torch.Tensor:
    """Teacher-like logits: N(0, 2) background, a spike on the label and a few raised similar classes."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, k, generator=g) * 2
    t[torch.arange(n), torch.randint(0, k, (n,), generator=g)] += torch.rand(n, generator=g) * 12 + 4
    return t.scatter_add_(1, torch.randint(0, k, (n, 8), generator=g), torch.rand(n, 8, generator=g) * 6)


def _kd_grad(student: torch.Tensor, teacher: torch.Tensor, tau: float, zscore: bool = False) -> torch.Tensor:
    s = student.clone().requires_grad_(True)
    a, b = s, teacher
    if zscore:
        a, b = ((v - v.mean(1, keepdim=True)) / v.std(1, keepdim=True) for v in (a, b))
    loss = F.kl_div(F.log_softmax(a / tau, 1), F.log_softmax(b / tau, 1), reduction="batchmean", log_target=True)
    (loss * tau * tau).backward()
    return s.grad


@pytest.mark.parametrize("bits, classes", [(8, 1000), (4, 1000), (4, 999), (8, 40000)])
def test_topk_exact_and_rest_within_half_a_step(bits, classes):
    t = _imagenet_like(64, classes)
    parts = compress_logits(t, 10, bits)
    assert parts["topi"].dtype == (torch.int16 if classes <= 32767 else torch.int32)
    assert parts["q"].shape == (64, (classes * bits + 7) // 8) and parts["q"].dtype == torch.uint8
    r = decompress_logits(parts, classes, bits)
    top = t.topk(10, 1).indices
    torch.testing.assert_close(r.gather(1, top), t.gather(1, top).half().float())
    rest = torch.ones_like(t, dtype=torch.bool).scatter_(1, top, False)
    step = parts["affine"][:, 1:2].expand_as(t)
    assert ((r - t).abs()[rest] <= step[rest] / 2 + 1e-5).all()


def test_constant_tail_keeps_the_tail_mass_at_temperature_1():
    t = _imagenet_like(32)
    r = decompress_logits(compress_logits(t, 10, 0), 1000, 0)
    torch.testing.assert_close(torch.logsumexp(r, 1), torch.logsumexp(t, 1), rtol=1e-3, atol=1e-3)


def test_measured_effect_on_the_kd_gradient():
    """The numbers quoted in docs/teacher_cache.md (k = 10): 8 bits ≤ 1 % for KD τ = 1, 4 and Z-score KD τ = 2."""
    t = _imagenet_like(192)
    s = t * 0.6 + torch.randn(t.shape, generator=torch.Generator().manual_seed(1)) * 1.5
    for bits, bound in ((8, 0.01), (4, 0.12)):
        r = decompress_logits(compress_logits(t, 10, bits), 1000, bits)
        for tau, z in ((1.0, False), (4.0, False), (2.0, True)):
            g, gr = _kd_grad(s, t, tau, z), _kd_grad(s, r, tau, z)
            assert (gr - g).norm() / g.norm() < bound, (bits, tau, z)
    # the constant tail loses the spread of the rest: Z-score KD is off by far more than the quantised stores
    r0 = decompress_logits(compress_logits(t, 10, 0), 1000, 0)
    g, g0 = _kd_grad(s, t, 2.0, True), _kd_grad(s, r0, 2.0, True)
    assert (g0 - g).norm() / g.norm() > 1.0


@pytest.fixture(scope="module")
def many_class_recipe(tmp_path_factory):
    """A 300-class synthetic distillation recipe with a random resnet8 teacher (store=auto → topk)."""
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    root = tmp_path_factory.mktemp("many")
    torch.manual_seed(0)
    ck.save_weights(root / "t.safetensors", build("resnet8", num_classes=300).state_dict())
    return write_yaml(root / "kd.yaml", {
        "data": {"name": "synthetic", "num_samples": 200, "train_split": 0.8, "num_classes": 300},
        "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": str(root / "t.safetensors")},
        "method": {"name": "kd", "temperature": 4.0}, "schedule": {"name": "constant"},
        "train": {"epochs": 2, "batch_size": 40, "progress": False, "threads": 1, "device": "cpu"},
    })  # fmt: skip


def test_cache_teacher_cli_topk_replays_close_to_the_teacher(tmp_path, many_class_recipe, cli, capsys):
    from kdlab.config import load_config
    from kdlab.engine import Trainer

    out = tmp_path / "c.safetensors"
    assert cli("cache-teacher", many_class_recipe, "--views", "2", "--out", out, "--batch-size", "64") == 0
    cache = TeacherCache(out)
    assert cache.store == "topk" and cache.info.meta["topk"] == 10 and cache.info.meta["tail_bits"] == 8
    assert out.stat().st_size < 160 * 2 * (10 * 4 + 300 + 8) + 4096  # vs 160 × 2 × 1,200 B for a float32 store
    tr = Trainer(load_config(many_class_recipe), tmp_path / "live")
    idx = torch.tensor([0, 5, 159, 77])
    x = tr.data.transform.train_batch(tr.data.train.x[idx], idx, 0, 2)  # view 1 = augmentation of epoch 2
    with torch.no_grad():
        live = tr.teacher(x)
    got = cache.outputs(2, idx).logits
    assert got.shape == live.shape and (got.argmax(1) == live.argmax(1)).all()
    spread = live.amax(1, keepdim=True) - live.amin(1, keepdim=True)
    assert ((got - live).abs() <= spread / 255 + 1e-2).all()
    # a distillation run replays it
    assert cli("distill", many_class_recipe, "--out", tmp_path / "run", "--quiet", f"teacher.cache={out}") == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["final_test_top5"] >= summary["final_test_acc"]


def test_cache_teacher_bad_store_one_line(tmp_path, many_class_recipe, cli, capsys):
    for bad in (["--store", "zip"], ["--tail-bits", "3"], ["--topk", "0"]):
        code = cli("cache-teacher", many_class_recipe, "--views", "1", "--out", tmp_path / "c.safetensors", *bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("kdlab: error:"), bad
    assert not (tmp_path / "c.safetensors").exists()


def test_streamed_random_resized_crop_views_replay_exactly(tmp_path, one_thread):
    """A float32 cache of an image folder: view v holds the teacher on the crops of epoch v + 1, for any index order."""
    import numpy as np
    from PIL import Image

    from kdlab.config import DataConfig
    from kdlab.data import build_dataset
    from kdlab.engine.teacher_cache import build_cache
    from kdlab.models import build

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
                img.save(tmp_path / split / f"c{c}" / f"{i}.png")
    data = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, workers=0))
    torch.manual_seed(0)
    teacher = build("resnet8", num_classes=3).eval()
    out = build_cache(teacher, data, 2, tmp_path / "c.safetensors", augment_seed=5, dtype=torch.float32, batch_size=5)
    cache = TeacherCache(out)
    assert cache.store == "full"
    idx = torch.tensor([11, 0, 6])
    (x, _, got_idx), = data.train_batches(3, seed=99, epoch=4, indices=idx, augment_seed=5, augment_epoch=2)
    assert got_idx.tolist() == idx.tolist()
    with torch.no_grad():
        live = teacher(x)
    torch.testing.assert_close(cache.outputs(4, idx).logits, live, rtol=0, atol=1e-5)  # epoch 4 → view 1 (epoch 2)
    assert not torch.allclose(cache.outputs(3, idx).logits, live)  # view 0 holds other crops
