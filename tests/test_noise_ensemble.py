import json

import torch

from kdlab.config import DataConfig, load_config
from kdlab.data import build_dataset
from kdlab.data.noise import flip_labels
from kdlab.engine import Trainer, run
from kdlab.engine.teachers import EnsembleTeacher, load_teacher

from conftest import CONFIGS, SMALL


def test_symmetric_label_noise_is_exact_seeded_and_always_changes_the_label():
    y = torch.arange(1000) % 10
    noisy, idx = flip_labels(y, 10, 0.3, seed=4)
    assert len(idx) == 300 and len(set(idx.tolist())) == 300
    changed = (noisy != y).nonzero().flatten()
    assert torch.equal(changed, idx)
    again, idx2 = flip_labels(y, 10, 0.3, seed=4)
    assert torch.equal(again, noisy) and not torch.equal(flip_labels(y, 10, 0.3, seed=5)[0], noisy)
    # new labels are spread over the other classes
    counts = torch.bincount((noisy[idx] - y[idx]).remainder(10), minlength=10)
    assert counts[0] == 0 and (counts[1:] > 10).all()


def test_label_noise_applies_to_train_only_and_is_recorded(tmp_path):
    clean = build_dataset(DataConfig(name="mnist1d", num_samples=1000))
    ds = build_dataset(DataConfig(name="mnist1d", num_samples=1000, label_noise=0.25, label_noise_seed=1))
    assert torch.equal(ds.test.y, clean.test.y) and torch.equal(ds.clean_train_y, clean.train.y)
    assert int((ds.train.y != clean.train.y).sum()) == 200
    res = run(load_config(CONFIGS / "mnist1d" / "student_ce.yaml", SMALL + ["data.label_noise=0.25"]), tmp_path / "r")
    assert res.summary["label_noise"] == {"fraction": 0.25, "seed": 0, "flipped": 200}


def test_ensemble_teacher_averages_member_logits(tmp_path, teacher_run):
    other = tmp_path / "t2"
    run(load_config(CONFIGS / "mnist1d" / "teacher_cnn.yaml", SMALL + ["seed=9", "train.epochs=1"]), other)
    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml",
                      SMALL + [f"teacher.checkpoint={teacher_run}",
                               f"teacher.ensemble=[{{name: mnist1d_cnn, checkpoint: {other}}}]"])  # fmt: skip
    ens = load_teacher(cfg.teacher, 10)
    assert isinstance(ens, EnsembleTeacher) and len(ens.members) == 2
    x = torch.randn(7, 40)
    with torch.no_grad():
        manual = (ens.members[0](x) + ens.members[1](x)) / 2
        assert torch.allclose(ens.forward_features(x).logits, manual)
    tr = Trainer(cfg, tmp_path / "s")
    assert isinstance(tr.teacher, EnsembleTeacher)
    s = tr.run().summary
    assert s["teacher_test_acc"] is not None and json.loads((tmp_path / "s" / "summary.json").read_text()) == s
