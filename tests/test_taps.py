"""Any-model feature taps: a user's nn.Module seen through forward hooks, with its own state-dict names."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from kdlab.config import ModelConfig
from kdlab.engine import checkpoint as ck
from kdlab.errors import ConfigError
from kdlab.models import TappedModel, build
from kdlab.trust import trusting  # this file's classes live in the current directory: not installed code


class ConvNet(nn.Module):
    """A user model whose forward returns a tuple (logits, extra): the hooks must not care."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)
        self.register_buffer("scale", torch.tensor(2.0))  # a top-level buffer

    def forward(self, x):
        f = self.layer4(self.body(x))
        return self.fc(self.scale * f.mean(dim=(2, 3))), f


class MLP(nn.Module):
    def __init__(self, hidden: int = 12) -> None:  # no num_classes parameter
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(self.net(x))


def test_conv_taps_follow_the_users_forward():
    torch.manual_seed(0)
    net = ConvNet()
    tapped = TappedModel(net, classifier="fc", features="layer4").eval()
    x = torch.randn(2, 3, 8, 8)
    out = tapped.forward_features(x)
    logits, fmap = net(x)
    assert torch.equal(out.logits, logits) and torch.equal(out.prepool, fmap)
    assert out.prepool.shape == (2, 16, 4, 4)
    assert torch.allclose(out.pooled, 2.0 * fmap.mean(dim=(2, 3)))  # the classifier's real input
    assert torch.allclose(tapped.classifier(out.pooled), out.logits)
    assert tapped.classifier is net.fc


def test_vector_taps_default_to_the_classifier_input():
    torch.manual_seed(0)
    tapped = TappedModel(MLP(), classifier="head")
    x = torch.randn(5, 40)
    out = tapped.forward_features(x)
    assert out.prepool.shape == (5, 12) and torch.equal(out.prepool, out.pooled)
    assert torch.equal(out.logits, tapped(x))


def test_state_dict_names_equal_the_users_module():
    torch.manual_seed(0)
    net = ConvNet()
    tapped = TappedModel(net, classifier="fc", features="layer4")
    assert list(tapped.state_dict()) == list(net.state_dict())
    # a checkpoint of the plain module loads into the tapped one, and back
    other = ConvNet()
    tapped.load_state_dict(other.state_dict(), strict=True)
    assert torch.equal(net.fc.weight, other.fc.weight)
    fresh = ConvNet()
    fresh.load_state_dict(tapped.state_dict(), strict=True)
    assert torch.equal(fresh.layer4[0].weight, other.layer4[0].weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        tapped.load_state_dict({k: v for k, v in other.state_dict().items() if k != "fc.bias"}, strict=True)
    # nested inside another module the prefix is kept
    outer = nn.Module()
    outer.student = tapped
    assert list(outer.state_dict()) == [f"student.{k}" for k in net.state_dict()]
    outer.load_state_dict(outer.state_dict(), strict=True)


def test_tapped_model_moves_buffers_and_trains():
    net = ConvNet()
    tapped = TappedModel(net, classifier="fc", features="layer4").to(torch.float64)
    assert net.scale.dtype == torch.float64 and tapped.state_dict()["scale"].dtype == torch.float64
    out = tapped.forward_features(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    (out.logits.sum() + out.prepool.sum()).backward()
    assert net.body[0].weight.grad is not None


def test_bad_module_names_are_one_line_errors():
    with pytest.raises(ConfigError, match="'layer5' is not a module of ConvNet \\(did you mean 'layer4'"):
        TappedModel(ConvNet(), classifier="fc", features="layer5")
    with pytest.raises(ConfigError, match="'layer4' is a Sequential, not the final nn.Linear"):
        TappedModel(ConvNet(), classifier="layer4")

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)
            self.fc = nn.Linear(40, 10)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ConfigError, match="'unused' did not run during forward"):
        TappedModel(Skips(), classifier="fc", features="unused").forward_features(torch.randn(2, 40))


def test_user_model_from_a_file_through_the_config(tmp_path, monkeypatch):
    src = tmp_path / "mynets.py"
    src.write_text(textwrap.dedent("""
        from torch import nn
        class Net(nn.Module):
            def __init__(self, num_classes=10, width=16):
                super().__init__()
                self.conv = nn.Sequential(nn.Conv1d(1, width, 3, padding=1), nn.ReLU())
                self.fc = nn.Linear(width, num_classes)
            def forward(self, x):
                return self.fc(self.conv(x.unsqueeze(1)).mean(2))
    """))
    monkeypatch.chdir(tmp_path)
    with trusting():  # a .py file, and a module in the current directory: imported only with --trust-code
        cfg = ModelConfig(name="mynets.py:Net", classifier="fc", features="conv", kwargs={"width": 6})
        model = build(cfg, num_classes=4)
        out = model.forward_features(torch.randn(3, 40))
        assert out.logits.shape == (3, 4) and out.prepool.shape == (3, 6, 40)
        assert list(model.state_dict()) == ["conv.0.weight", "conv.0.bias", "fc.weight", "fc.bias"]
        # importable module path too (the file's folder on sys.path)
        monkeypatch.syspath_prepend(str(tmp_path))
        assert isinstance(build(ModelConfig(name="mynets:Net", classifier="fc"), num_classes=3), TappedModel)


def test_user_model_config_errors(tmp_path, monkeypatch):
    with pytest.raises(Exception, match="classifier is required"):
        ModelConfig(name="torch.nn:Linear")
    with pytest.raises(Exception, match="model.name 'no_such_pkg.mod:Net': cannot import 'no_such_pkg'"):
        ModelConfig(name="no_such_pkg.mod:Net", classifier="fc")
    with pytest.raises(Exception, match="classifier / features name the taps of user models"):
        ModelConfig(name="resnet8", classifier="fc")
    with pytest.raises(ConfigError, match="has 10 outputs but the data has 3"), trusting():
        build("test_taps:MLP", num_classes=3, classifier="head")


def test_head_on_a_user_model_is_saved_and_reloaded():
    """SimKD-style head on a tapped user model: weights keep user names plus kd_head.*, and reload alone."""
    from kdlab.methods import build_method

    torch.manual_seed(0)
    teacher = build("mnist1d_cnn", num_classes=10).eval()
    with trusting():
        student = build("test_taps:MLP", num_classes=10, classifier="head")
        fresh = build("test_taps:MLP", num_classes=10, classifier="head")
    method = build_method("simkd", {"connector": "1x1"})
    method.setup(student, teacher, torch.randn(2, 40))
    state = student.state_dict()
    assert [k for k in state if not k.startswith("kd_head.")] == list(MLP().state_dict())
    assert "kd_head.classifier.weight" in state
    ck.load_into(fresh, state, "MLP", "test")
    x = torch.randn(4, 40)
    student.eval(), fresh.eval()
    assert torch.equal(fresh(x), student(x))
    assert torch.equal(fresh(x), teacher.classifier(fresh.forward_features(x).pooled))


def test_user_model_example_distills_through_hooks(tmp_path, _mnist1d_cache):
    """examples/user_model.py: a model defined in the example file, distilled with SimKD, reloaded alone."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "user_model.py"
    spec = importlib.util.spec_from_file_location("kdlab_example_user_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--out", str(tmp_path), "--teacher-epochs", "1", "--student-epochs", "1",
                           "--num-samples", "1000", "--threads", "1"])  # fmt: skip
    assert result["deployed_acc"] == pytest.approx(result["final_test_acc"])
    weights = ck.load_weights_file(tmp_path / "simkd" / "model.safetensors")
    assert "out.weight" in weights and "trunk.0.weight" in weights and "kd_head.classifier.weight" in weights


def test_user_model_as_teacher_and_student_in_a_run(tmp_path, cli, _mnist1d_cache):
    """Config sections name user models (teacher and student); weights files use the user's own key names."""
    from conftest import CONFIGS, SMALL, write_yaml

    torch.manual_seed(0)
    weights = tmp_path / "mlp_teacher.safetensors"
    ck.save_weights(weights, MLP(hidden=32).state_dict())  # a "checkpoint" written from the plain module
    cfg = write_yaml(tmp_path / "run.yaml", {
        "base": str(CONFIGS / "mnist1d" / "base.yaml"),
        "model": {"name": "test_taps:MLP", "classifier": "head", "kwargs": {"hidden": 16}},
        "teacher": {"name": "test_taps:MLP", "classifier": "head", "kwargs": {"hidden": 32},
                    "checkpoint": str(weights)},
        "method": {"name": "ijckd"},
    })  # fmt: skip
    out = tmp_path / "run"
    assert cli("distill", cfg, *SMALL, "train.epochs=1", "--out", out, "--quiet", "--trust-code") == 0
    assert json.loads((out / "summary.json").read_text())["trusted_code"] == ["test_taps:MLP"]
    saved = ck.load_weights_file(out / "model.safetensors")
    assert {k for k in saved if not k.startswith("kd_head.")} == set(MLP(hidden=16).state_dict())
    assert torch.equal(saved["kd_head.classifier.weight"], ck.load_weights_file(weights)["head.weight"])
