"""Two-view training (MLKD): a strong view of the same samples reaches the method, seeded like the weak one."""

import torch

from kdlab import losses as L
from kdlab.config import load_config
from kdlab.data import CIFAR100_MEAN, CIFAR100_STD, ImageAugment
from kdlab.data.augment import VectorTransform
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.methods.mlkd import MLKD
from kdlab.models import build

from conftest import CONFIGS, SMALL


def test_strong_views_are_seeded_and_differ_from_the_weak_view():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    idx = torch.arange(8)
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=8)
    a, b = aug.strong_batch(x, idx, 0, 1), aug.strong_batch(x, idx, 0, 1)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, aug.strong_batch(x, idx, 0, 2)) and not torch.equal(a, aug.train_batch(x, idx, 0, 1))
    assert torch.equal(aug.strong_batch(x[[5]], idx[[5]], 0, 1)[0], a[5])  # a function of the sample index
    v = VectorTransform(0, 8)
    s = v.strong_batch(torch.randn(8, 40), idx, 0, 1)
    assert s.shape == (8, 40) and torch.isfinite(s).all()


def test_mlkd_receives_the_strong_view(tmp_path, teacher_run, monkeypatch):
    seen = {}
    original = L.mlkd_terms

    def spy(sw, tw, y, ss, ts, *args, **kw):
        seen["strong"] = (ss, ts, sw)
        return original(sw, tw, y, ss, ts, *args, **kw)

    monkeypatch.setattr("kdlab.methods.mlkd.L.mlkd_terms", spy)
    cfg = load_config(CONFIGS / "mnist1d" / "student_mlkd.yaml", SMALL + [f"teacher.checkpoint={teacher_run}", "train.epochs=1"])
    assert MLKD.views == 2
    summary = Trainer(cfg, tmp_path / "r").run().summary
    ss, ts, sw = seen["strong"]
    assert ss is not None and ts is not None and ss.shape == sw.shape and not torch.equal(ss, sw)
    assert summary["final_test_acc"] > 0


def test_mlkd_on_image_data_two_views(tmp_path):
    path = tmp_path / "t.safetensors"
    ck.save_weights(path, build("resnet8", num_classes=10).state_dict())
    base = {"data": {"name": "synthetic", "num_samples": 80, "num_classes": 10}, "model": {"name": "resnet8"},
            "teacher": {"name": "resnet8", "checkpoint": str(path)}, "method": {"name": "mlkd"},
            "train": {"epochs": 1, "batch_size": 32, "progress": False, "threads": 1}}  # fmt: skip
    res = Trainer(load_config(None, [], base=base), tmp_path / "r").run()
    assert {"train_ce", "train_kd", "train_cc", "train_bc"} <= set(
        __import__("json").loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    )
    assert res.summary["epochs"] == 1
