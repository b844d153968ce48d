"""The strong view of two-view methods (kdlab.data.strong): the MLKD release's RandAugment policy against PIL,
counter-based per-batch randomness on the device, O(batch) allocation per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlab.data.augment import CIFAR100_MEAN, CIFAR100_STD, ImageAugment, VectorTransform
from kdlab.data.strong import RAND_OPS, _rand_op, counter_uniform


def test_counter_uniform_is_a_pure_function_of_seed_epoch_index():
    idx = torch.arange(50000)
    u = counter_uniform(3, 7, 1, idx, 4)
    assert u.shape == (50000, 4) and 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.std()) - 12**-0.5) < 0.01
    assert torch.equal(counter_uniform(3, 7, 1, idx[[9, 2]], 4), u[[9, 2]])  # whatever batch a sample comes in
    for other in ((4, 7, 1), (3, 8, 1), (3, 7, 2)):
        assert not torch.equal(counter_uniform(*other, idx[:100], 4), u[:100])
    assert abs(float(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1])) < 0.02


def _allocated_bytes(fn) -> int:
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())  # every allocation, summed


@pytest.mark.parametrize("policy", ["randaugment", "jitter_cutout"])
def test_strong_view_allocation_is_per_batch_not_per_dataset(policy, one_thread):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    idx = torch.tensor([5, 900, 17, 3, 64, 2, 800, 1])
    small = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=1000, strong=policy)
    huge = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=50_000_000, strong=policy)
    a = _allocated_bytes(lambda: small.strong_batch(x, idx, 0, 1))
    b = _allocated_bytes(lambda: huge.strong_batch(x, idx, 0, 1))
    # independent of the dataset size (one float per draw per sample of 50M samples would be 200 MB per draw)
    assert a == b and a < 300 * x.numel() * 4
    assert torch.equal(small.strong_batch(x, idx, 0, 1), huge.strong_batch(x, idx, 0, 1))
    vec = VectorTransform(shift=2, num_samples=50_000_000)
    v = torch.randn(8, 40)
    assert _allocated_bytes(lambda: vec.strong_batch(v, idx, 0, 1)) < 100 * v.numel() * 4


def test_strong_view_is_deterministic_per_sample_and_differs_between_epochs_and_policies():
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    idx = torch.arange(10, 16)
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=100)
    v = aug.strong_batch(x, idx, 0, 1)
    assert v.shape == x.shape and v.dtype == torch.float32
    assert torch.equal(aug.strong_batch(x[[4, 1]], idx[[4, 1]], 0, 1), v[[4, 1]])
    assert not torch.equal(aug.strong_batch(x, idx, 0, 2), v)
    assert not torch.equal(ImageAugment(CIFAR100_MEAN, CIFAR100_STD, 100, strong="jitter_cutout").strong_batch(
        x, idx, 0, 1), v)  # fmt: skip


def _pil_op(name: str, img, v: float):
    from PIL import Image, ImageEnhance, ImageOps

    return {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(v),
        "Color": lambda: ImageEnhance.Color(img).enhance(v),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(v),
        "Equalize": lambda: ImageOps.equalize(img),
        "Identity": lambda: img,
        "Posterize": lambda: ImageOps.posterize(img, max(1, int(v))),
        "Rotate": lambda: img.rotate(v),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(v),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(img, v),
        "TranslateX": lambda: img.transform(img.size, Image.AFFINE, (1, 0, v * img.size[0], 0, 1, 0)),
        "TranslateY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, v * img.size[1])),
    }[name]()


@pytest.mark.parametrize("k", range(len(RAND_OPS)))
def test_each_randaugment_op_matches_pil(k):
    """The release applies its ops with PIL; the tensor versions agree to rounding (colour ops: ±2 levels) and, for
    the nearest-neighbour affine maps, up to pixels whose source coordinate falls on a pixel border (< 5 %)."""
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(k)
    imgs = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    imgs[:, 8:20, 8:20] = rng.integers(90, 150, (6, 12, 12, 3))
    u = torch.from_numpy(rng.random(6).astype(np.float32))
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
    out = _rand_op(x, torch.full((6,), k), u).round().clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.int64)
    name, lo, hi = RAND_OPS[k]
    for b in range(6):
        v = float(np.float32(lo) + np.float32(hi - lo) * u[b].numpy())
        ref = np.asarray(_pil_op(name, Image.fromarray(imgs[b]), v)).astype(np.int64)
        diff = np.abs(out[b] - ref)
        assert (diff > 2).mean() < 0.05, (name, v, float((diff > 2).mean()))
        if name not in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
            assert diff.max() <= 2, (name, v, int(diff.max()))
