"""`kdlab import-checkpoint`: RepDistiller / mdistiller files → safetensors, without running pickled code."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kdlab.engine import checkpoint as ck
from kdlab.models import build

from conftest import CONFIGS, SMALL


def _trained_like(name: str, num_classes: int = 100, seed: int = 0) -> torch.nn.Module:
    """A model with non-trivial weights and BN statistics (one train-mode forward), in eval mode."""
    torch.manual_seed(seed)
    model = build(name, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()(torch.randn(4, 3, 32, 32) if "mnist" not in name else torch.randn(4, 40))
    return model.eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _converted(path: Path, arch: str, num_classes: int = 100) -> torch.nn.Module:
    model = build(arch, num_classes=num_classes)
    ck.load_into(model, ck.load_weights_file(path), arch, str(path))
    return model.eval()


def test_repdistiller_checkpoint_gives_same_logits(tmp_path, cli, capsys):
    model = _trained_like("wrn_16_1")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    src = tmp_path / "ckpt_epoch_240.pth"  # RepDistiller train_teacher.py layout
    state = {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(73.26), "optimizer": opt.state_dict()}
    torch.save(state, src)
    out = tmp_path / "wrn_16_1.safetensors"
    assert cli("import-checkpoint", src, "--arch", "wrn_16_1", "--out", out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epoch"] == 240 and summary["accuracy"] == pytest.approx(73.26, abs=1e-4)
    assert summary["num_classes"] == 100 and summary["prefix"] == ""
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(_logits(_converted(out, "wrn_16_1"), x), _logits(model, x))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["kdlab.arch"] == "wrn_16_1" and meta["kdlab.source"] == "ckpt_epoch_240.pth"


def test_checkpoint_saved_on_gpu_loads_on_cpu(tmp_path, cli, monkeypatch):
    """RepDistiller trains on GPU and saves CUDA tensors (0-dim CUDA accuracy too): loaded with map_location=cpu."""
    model = _trained_like("resnet8")
    src = tmp_path / "resnet8_best.pth"
    with monkeypatch.context() as m:  # tag every storage as CUDA, as torch.save does for GPU tensors
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"epoch": 200, "model": model.state_dict(), "best_acc": torch.tensor(70.5)}, src)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(src, weights_only=True)  # the file really is CUDA-tagged
    out = tmp_path / "r8.safetensors"
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", out) == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(_converted(out, "resnet8"), x), _logits(model, x))


def test_mdistiller_full_state_takes_the_student(tmp_path, cli):
    student, teacher = _trained_like("resnet8", seed=1), _trained_like("resnet20", seed=2)
    distiller = {f"module.student.{k}": v for k, v in student.state_dict().items()}
    distiller.update({f"module.teacher.{k}": v for k, v in teacher.state_dict().items()})
    distiller["module.conv_reg.weight"] = torch.randn(64, 64, 1, 1)  # a method's own module
    src = tmp_path / "latest"  # mdistiller files have no extension
    torch.save({"epoch": 12, "model": distiller, "optimizer": {}, "best_acc": -1}, src)
    out = tmp_path / "r8.safetensors"
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", out) == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(_converted(out, "resnet8"), x), _logits(student, x))


def test_mdistiller_student_file_and_legacy_format_and_num_classes(tmp_path, cli):
    model = _trained_like("ShuffleV1", num_classes=10)
    src = tmp_path / "student_best"
    torch.save({"model": model.state_dict()}, src, _use_new_zipfile_serialization=False)  # pre-1.6 torch format
    out = tmp_path / "s.safetensors"
    assert cli("import-checkpoint", src, "--arch", "ShuffleV1", "--out", out) == 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(_converted(out, "ShuffleV1", num_classes=10), x), _logits(model, x))


def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, cli, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    src = tmp_path / "evil.pth"
    torch.save({"model": build("resnet8").state_dict(), "extra": Payload()}, src)
    out = tmp_path / "evil.safetensors"
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refused to unpickle 'exec'" in err
    assert not marker.exists() and not out.exists()
    # the payload is real: an unrestricted load would have run it
    torch.load(src, weights_only=False)
    assert marker.read_text() == "ran"


def test_repdistiller_last_file_with_namespace_is_refused_clearly(tmp_path, cli, capsys):
    model = build("resnet8")
    src = tmp_path / "resnet8_last.pth"
    torch.save({"opt": argparse.Namespace(model="resnet8", learning_rate=0.05), "model": model.state_dict()}, src)
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", tmp_path / "o.safetensors") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "argparse.Namespace" in err and "ckpt_epoch_" in err


def test_errors_are_one_line_and_nothing_is_overwritten(tmp_path, cli, capsys):
    model = build("resnet8")
    src = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict()}, src)
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", out) == 2
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert cli("import-checkpoint", src, "--arch", "resnet8", "--out", out, "--overwrite") == 0
    assert ck.load_weights_file(out).keys() == model.state_dict().keys()
    capsys.readouterr()
    other = tmp_path / "o2.safetensors"
    assert cli("import-checkpoint", src, "--arch", "resnet20", "--out", other) == 2
    assert "does not fit architecture 'resnet20'" in capsys.readouterr().err and not other.exists()
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    assert cli("import-checkpoint", tmp_path / "junk.pth", "--arch", "resnet8", "--out", other) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert cli("import-checkpoint", tmp_path / "missing.pth", "--arch", "resnet8", "--out", other) == 2
    assert cli("import-checkpoint", src, "--arch", "resnet9", "--out", other) == 2
    assert "did you mean 'resnet8'" in capsys.readouterr().err


def test_converted_file_is_accepted_as_teacher(tmp_path, cli, _mnist1d_cache):
    """A RepDistiller-style checkpoint of the MNIST-1D CNN, converted, then used by `kdlab distill`."""
    teacher = _trained_like("mnist1d_cnn", num_classes=10)
    src = tmp_path / "mnist1d_cnn_best.pth"
    torch.save({"epoch": 3, "model": teacher.state_dict(), "best_acc": torch.tensor(50.0)}, src)
    weights = tmp_path / "teacher.safetensors"
    assert cli("import-checkpoint", src, "--arch", "mnist1d_cnn", "--out", weights) == 0
    cfg = CONFIGS / "mnist1d" / "student_srrl.yaml"
    out = tmp_path / "run"
    args = [*SMALL, "train.epochs=1", f"teacher.checkpoint={weights}"]
    assert cli("distill", cfg, *args, "--out", out, "--quiet") == 0
    assert json.loads((out / "summary.json").read_text())["teacher"] == "mnist1d_cnn"
