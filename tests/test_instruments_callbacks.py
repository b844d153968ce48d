"""Per-epoch instruments inside the Trainer: values against a direct computation, no effect on training, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdlab.config import load_config
from kdlab.data import Dataset, Split, VectorTransform
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.errors import ConfigError
from kdlab.models import build


def _dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(160) % 10
    x = torch.randn(160, 40, generator=g) + y.unsqueeze(1) * 0.1
    yt = torch.arange(40) % 10
    xt = torch.randn(40, 40, generator=g) + yt.unsqueeze(1) * 0.1
    return Dataset("mnist1d", Split(x, y), Split(xt, yt), 10, VectorTransform())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    out = {}
    for arch in ("mnist1d_mlp", "mnist1d_cnn"):
        torch.manual_seed(123)
        ck.save_weights(root / f"{arch}.safetensors", build(arch, num_classes=10).state_dict())
        out[arch] = root / f"{arch}.safetensors"
    return out


def _cfg(method: str, teacher=None, instruments=(), epochs: int = 3, arch: str = "mnist1d_mlp"):
    raw = {
        "seed": 0,
        "model": {"name": "mnist1d_mlp"},
        "method": {"name": method},
        "train": {"epochs": epochs, "batch_size": 32, "eval_batch_size": 64, "progress": False, "device": "cpu"},
        "schedule": {"name": "constant"},
        "instruments": list(instruments),
    }
    if teacher is not None:
        raw["teacher"] = {"name": arch, "checkpoint": str(teacher)}
    return load_config(None, base=raw)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kd_instruments_match_direct_computation(tmp_path, teachers):
    ds = _dataset()
    cfg = _cfg("kd", teachers["mnist1d_mlp"], ["alignment", "logit_stats"])
    Trainer(cfg, tmp_path / "run", dataset=ds).run()
    rows = _rows(tmp_path / "run")
    assert len(rows) == 3
    last = rows[-1]
    student = build("mnist1d_mlp", num_classes=10)
    student.load_state_dict(ck.load_weights_file(tmp_path / "run" / "model.safetensors"))
    teacher = build("mnist1d_mlp", num_classes=10)
    teacher.load_state_dict(ck.load_weights_file(teachers["mnist1d_mlp"]))
    wt, ws = teacher.fc.weight.detach().double(), student.fc.weight.detach().double()
    assert last["align_mu"] == pytest.approx(math.sqrt(((wt - ws) ** 2).sum().item()), rel=1e-5)
    assert last["align_cos"] == pytest.approx(((wt * ws).sum() / (wt.norm() * ws.norm())).item(), rel=1e-5)
    student.eval(), teacher.eval()
    with torch.no_grad():
        zs, zt = student(ds.train.x).double(), teacher(ds.train.x).double()
        r = student.body(ds.train.x).double()
    sums = zs.sum(1)
    assert last["logit_sum_mean"] == pytest.approx(sums.mean().item(), rel=1e-4, abs=1e-5)
    assert last["logit_sum_std"] == pytest.approx(sums.std(correction=0).item(), rel=1e-4)
    assert last["logit_std_mean"] == pytest.approx(zs.std(1, correction=0).mean().item(), rel=1e-4)
    assert last["feature_norm_mean"] == pytest.approx(r.norm(dim=1).mean().item(), rel=1e-4)
    assert last["logit_dist_mean"] == pytest.approx((zs - zt).norm(dim=1).mean().item(), rel=1e-4)
    assert last["teacher_logit_sum_mean"] == pytest.approx(zt.sum(1).mean().item(), rel=1e-4, abs=1e-5)
    assert rows[0]["align_mu"] != last["align_mu"]  # measured every epoch, not once
    for row in rows:
        assert 0 <= row["instr_alignment_s"] < row["epoch_time_s"] + 1
        assert row["instr_logit_stats_s"] >= 0


def test_instruments_do_not_change_training(tmp_path, teachers):
    ds = _dataset()
    Trainer(_cfg("kd", teachers["mnist1d_mlp"]), tmp_path / "plain", dataset=ds).run()
    Trainer(_cfg("kd", teachers["mnist1d_mlp"], ["alignment", "logit_stats"]), tmp_path / "inst", dataset=ds).run()
    for a, b in zip(_rows(tmp_path / "plain"), _rows(tmp_path / "inst")):
        assert a["train_loss"] == b["train_loss"] and a["test_acc"] == b["test_acc"]
    wa = ck.load_weights_file(tmp_path / "plain" / "model.safetensors")
    wb = ck.load_weights_file(tmp_path / "inst" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ce_run_with_reference_teacher_records_alignment(tmp_path, teachers):
    cfg = _cfg("ce", teachers["mnist1d_mlp"], ["alignment", "logit_stats"], epochs=2)
    trainer = Trainer(cfg, tmp_path / "ce", dataset=_dataset())
    assert trainer.teacher is None  # the reference teacher takes no part in training
    trainer.run()
    rows = _rows(tmp_path / "ce")
    assert all("align_mu" in r and "logit_dist_mean" in r for r in rows)


def test_alignment_without_teacher_is_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="needs a teacher classifier"):
        Trainer(_cfg("ce", None, ["alignment"]), out, dataset=_dataset())
    assert not out.exists()


def test_alignment_with_unequal_classifiers_is_refused_before_writing(tmp_path, teachers):
    out = tmp_path / "run"
    cfg = _cfg("kd", teachers["mnist1d_cnn"], ["alignment"], arch="mnist1d_cnn")
    with pytest.raises(ConfigError, match=r"equal classifier shapes: teacher \[10, 128\] vs student \[10, 100\]"):
        Trainer(cfg, out, dataset=_dataset())
    assert not out.exists()


def test_logit_stats_without_teacher_records_student_only(tmp_path):
    Trainer(_cfg("ce", None, ["logit_stats"], epochs=1), tmp_path / "run", dataset=_dataset()).run()
    (row,) = _rows(tmp_path / "run")
    assert "logit_sum_std" in row and "logit_dist_mean" not in row and "align_mu" not in row


def test_unknown_instrument_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown instrument 'alignmnt'.*did you mean 'alignment'"):
        _cfg("ce", None, ["alignmnt"])
