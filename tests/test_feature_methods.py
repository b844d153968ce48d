"""Connectors, feature / teacher-classifier losses, and the methods fitnet, srrl, simkd, ijckd, teacher_classifier."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdlab.engine import checkpoint as ck
from kdlab.errors import ConfigError
from kdlab.losses import feature as LF
from kdlab.methods import build_method
from kdlab.models import build
from kdlab.models.connectors import Connector, align_teacher, build_connector
from kdlab.models.heads import FrozenLinear
from kdlab.models.output import keep_fields

from conftest import CONFIGS, SMALL

# --------------------------------------------------------------------------------------------------------------------
# connectors


def _layers(connector: Connector) -> list[nn.Module]:
    return [m for m in connector.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize(
    "kind, kernels, widths",
    [("1x1", [1], [(64, 256)]), ("1x1-1x1", [1, 1], [(64, 256), (256, 256)]),
     ("bottleneck", [1, 3, 1], [(64, 128), (128, 128), (128, 256)]), ("identity", [], [])],
)  # fmt: skip
def test_connector_kinds_from_a_dry_forward(kind, kernels, widths):
    s, t = torch.randn(2, 64, 8, 8), torch.randn(2, 256, 8, 8)
    if kind == "identity":
        with pytest.raises(ConfigError, match="equal widths"):
            build_connector(kind, s, t)
        s = torch.randn(2, 256, 8, 8)
    c = build_connector(kind, s, t, factor=2)
    layers = _layers(c)
    assert [m.kernel_size[0] for m in layers] == kernels
    assert [(m.in_channels, m.out_channels) for m in layers] == widths
    assert all(m.bias is None for m in layers)  # bias-free, each followed by BN and ReLU
    for block in c.blocks:
        assert isinstance(block[1], nn.BatchNorm2d) and isinstance(block[2], nn.ReLU)
    assert c(s).shape == t.shape


def test_larger_map_is_pooled_to_the_smaller():
    # student larger: the connector pools the student map before its layers
    s, t = torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)
    c = build_connector("1x1", s, t).eval()
    out = c(s)
    assert out.shape == (2, 32, 4, 4) and c.target.tolist() == [4, 4]
    assert torch.allclose(out, c.blocks(F.adaptive_avg_pool2d(s, (4, 4))))
    assert align_teacher(t, out) is t
    # teacher larger: the teacher map is pooled to the student's size
    s, t = torch.randn(2, 16, 4, 4), torch.randn(2, 32, 8, 8)
    c = build_connector("bottleneck", s, t)
    out = c(s)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(align_teacher(t, out), F.adaptive_avg_pool2d(t, (4, 4)))


def test_vector_and_1d_connectors():
    vec, fmap1d = torch.randn(4, 100), torch.randn(4, 128, 10)
    c = build_connector("bottleneck", vec, fmap1d)  # MLP student -> 1-D CNN teacher
    assert [type(m) for m in _layers(c)] == [nn.Linear] * 3 and isinstance(c.blocks[0][1], nn.BatchNorm1d)
    out = c(vec)
    assert out.shape == (4, 128)
    assert torch.equal(align_teacher(fmap1d, out), fmap1d.mean(dim=2))
    c = build_connector("1x1", fmap1d, vec)  # map student -> vector teacher: global pool, then Linear
    assert c(fmap1d).shape == (4, 100) and type(_layers(c)[0]) is nn.Linear
    c = build_connector("bottleneck", torch.randn(4, 32, 20), fmap1d)  # 1-D maps of different length
    assert [type(m) for m in _layers(c)] == [nn.Conv1d] * 3 and c(torch.randn(4, 32, 20)).shape == (4, 128, 10)
    with pytest.raises(ConfigError, match="unknown connector 'conv'"):
        build_connector("conv", vec, vec)


SHAPES = [((2, 16, 8, 8), (2, 32, 4, 4)), ((3, 100), (3, 128, 10)), ((3, 8, 20), (3, 16, 10))]


@pytest.mark.parametrize("shapes", SHAPES)
def test_connector_rebuilds_from_its_state_dict(shapes):
    s, t = torch.randn(*shapes[0]), torch.randn(*shapes[1])
    c = build_connector("bottleneck", s, t)
    c.train()(s)  # move the BN statistics
    rebuilt = Connector.from_state(c.state_dict())
    rebuilt.load_state_dict(c.state_dict(), strict=True)
    c.eval(), rebuilt.eval()
    assert torch.equal(rebuilt(s), c(s))


# --------------------------------------------------------------------------------------------------------------------
# losses against direct computations


def test_simkd_and_fitnet_are_elementwise_mse():
    s, t = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    direct = ((s - t) ** 2).sum() / s.numel()
    assert torch.allclose(LF.simkd(s, t), direct) and torch.allclose(LF.fitnet(s, t), direct)
    with pytest.raises(ValueError, match="differ"):
        LF.simkd(s, t[:, :, :2, :2])


def test_srrl_terms():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)
    w, b, zt = torch.randn(5, 6), torch.randn(5), torch.randn(4, 5)
    feature, logit = LF.srrl(s, t, lambda v: v @ w.T + b, zt)
    ps = s.sum(dim=(2, 3)) / 9
    pt = t.sum(dim=(2, 3)) / 9
    assert torch.allclose(feature, ((ps - pt) ** 2).mean())
    assert torch.allclose(logit, ((ps @ w.T + b - zt) ** 2).mean())


def test_ijckd_terms():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6, 5), torch.randn(4, 6, 5)
    w, b, zt, y = torch.randn(3, 6), torch.randn(3), torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    terms = LF.ijckd(s, t, lambda v: v @ w.T + b, zt, y)
    z = s.mean(dim=2) @ w.T + b
    ce = -(z - z.exp().sum(1, keepdim=True).log())[torch.arange(4), y].mean()
    assert set(terms) == {"ce", "logit", "feature"}
    assert torch.allclose(terms["ce"], ce)
    assert torch.allclose(terms["logit"], ((z - zt) ** 2).mean())
    assert torch.allclose(terms["feature"], ((s - t) ** 2).mean())


def test_gradients_flow_through_the_frozen_classifier_only():
    lin = nn.Linear(6, 3)
    frozen = FrozenLinear.copy_of(lin)
    assert list(frozen.parameters()) == [] and list(frozen.state_dict()) == ["weight", "bias"]
    s = torch.randn(4, 6, requires_grad=True)
    LF.srrl(s, torch.randn(4, 6), frozen, torch.randn(4, 3))[1].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert not frozen.weight.requires_grad and frozen.weight.grad is None


# --------------------------------------------------------------------------------------------------------------------
# methods


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = build("mnist1d_cnn", num_classes=10)
    with torch.no_grad():
        teacher.train()(torch.randn(16, 40))  # non-trivial BN statistics
    return teacher.eval().requires_grad_(False)


def _step(student, method, teacher, steps: int = 3):
    params = list(student.parameters()) + list(method.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
        with torch.inference_mode():
            t_out = teacher.forward_features(x)
        t_out = keep_fields(t_out, t_out._fields)  # clone every field out of inference mode
        terms = method.losses(student.forward_features(x), t_out, y, 1)
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
    return terms


@pytest.mark.parametrize("name", ["simkd", "ijckd", "teacher_classifier"])
@pytest.mark.parametrize("student_name", ["mnist1d_mlp", "mnist1d_cnn"])
def test_head_methods_predict_through_the_frozen_teacher_classifier(pair, name, student_name):
    teacher = pair
    student = build(student_name, num_classes=10)
    method = build_method(name, {})
    method.setup(student, teacher, torch.randn(2, 40))
    terms = _step(student, method, teacher)
    assert all(torch.isfinite(v) for v in terms.values())
    head = student.head
    # frozen for real: not a parameter, no gradient, unchanged by SGD with weight decay, equal to the teacher's
    assert all(p is not head.classifier.weight for p in student.parameters())
    assert head.classifier.weight.grad is None
    assert torch.equal(head.classifier.weight, teacher.classifier.weight)
    assert torch.equal(head.classifier.bias, teacher.classifier.bias)
    assert not any(p.requires_grad for p in student.own_classifier.parameters())
    # prediction = teacher classifier on the pooled connected feature of the student's backbone
    student.eval()
    x = torch.randn(5, 40)
    with torch.no_grad():
        own = student.backbone_features(x)
        connected = head.connector(own.prepool)
        pooled = connected if connected.dim() == 2 else connected.mean(dim=2)
        expected = teacher.classifier(pooled)
        out = student.forward_features(x)
    assert torch.allclose(method.predict(out), expected, atol=1e-6)
    assert torch.equal(student(x), method.predict(out))
    assert student.classifier is head.classifier
    # saved with the student: a plain build + strict load reproduces the predictions, no teacher needed
    fresh = build(student_name, num_classes=10)
    ck.load_into(fresh, student.state_dict(), student_name, "test")
    assert torch.equal(fresh.eval()(x), student(x))


def test_method_terms_and_weights(pair):
    teacher = pair
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    cases = {
        ("fitnet", ()): {"ce", "feature"},
        ("srrl", ()): {"ce", "feature", "logit"},
        ("simkd", ()): {"feature"},
        ("ijckd", ()): {"ce", "logit"},
        ("ijckd", (("ce_weight", 0.0), ("feat_weight", 0.5))): {"logit", "feature"},
        ("teacher_classifier", ()): {"ce"},
    }
    for (name, params), expected in cases.items():
        student = build("mnist1d_mlp", num_classes=10)
        method = build_method(name, dict(params))
        method.setup(student, teacher, x[:2])
        terms = method.losses(student.forward_features(x), teacher.forward_features(x), y, 1)
        assert set(terms) == expected, name
    # weights scale the terms exactly
    student = build("mnist1d_mlp", num_classes=10)
    a = build_method("ijckd", {"ce_weight": 0.2, "logit_weight": 3.0, "feat_weight": 0.5})
    a.setup(student, teacher, x[:2])
    s_out, t_out = student.forward_features(x), teacher.forward_features(x)
    raw = LF.ijckd(s_out.prepool, align_teacher(t_out.prepool, s_out.prepool), teacher.classifier, t_out.logits, y)
    got = a.losses(s_out, t_out, y, 1)
    assert torch.allclose(got["ce"], 0.2 * raw["ce"]) and torch.allclose(got["logit"], 3.0 * raw["logit"])
    assert torch.allclose(got["feature"], 0.5 * raw["feature"])
    with pytest.raises(ValueError, match="must be positive"):
        build_method("ijckd", {"ce_weight": 0, "logit_weight": 0, "feat_weight": 0})


def test_srrl_and_fitnet_keep_the_students_classifier(pair):
    teacher = pair
    for name in ("srrl", "fitnet"):
        student = build("mnist1d_mlp", num_classes=10)
        method = build_method(name, {})
        method.setup(student, teacher, torch.randn(2, 40))
        assert student.head is None
        _step(student, method, teacher, steps=2)
        out = student.forward_features(torch.randn(3, 40))
        assert torch.equal(method.predict(out), out.logits)
        assert any(k.startswith("connector.") for k in method.state_dict())
    # SRRL's teacher classifier: saved with the method (resume), frozen (no parameters), equal to the teacher's
    student = build("mnist1d_mlp", num_classes=10)
    srrl = build_method("srrl", {})
    srrl.setup(student, teacher, torch.randn(2, 40))
    _step(student, srrl, teacher, steps=2)
    assert "teacher_classifier.weight" in srrl.state_dict()
    assert list(srrl.teacher_classifier.parameters()) == []
    assert torch.equal(srrl.teacher_classifier.weight, teacher.classifier.weight)


# --------------------------------------------------------------------------------------------------------------------
# end to end from the CLI (MNIST-1D, tiny)


@pytest.mark.parametrize(
    "recipe", ["student_fitnet", "student_srrl", "student_simkd", "student_ijckd", "student_teacher_classifier",
               "student_cnn_simkd"],
)  # fmt: skip
def test_cli_distill_and_deploy_alone(recipe, teacher_run, tmp_path, cli, capsys):
    out = tmp_path / recipe
    args = [*SMALL, "train.epochs=1", f"teacher.checkpoint={teacher_run}"]
    assert cli("distill", CONFIGS / "mnist1d" / f"{recipe}.yaml", *args, "--out", out, "--quiet") == 0
    summary = json.loads((out / "summary.json").read_text())
    weights = ck.load_weights_file(out / "model.safetensors")
    has_head = any(k.startswith("kd_head.") for k in weights)
    assert has_head == (recipe not in ("student_fitnet", "student_srrl"))
    capsys.readouterr()
    # the saved student alone (no teacher) gives the accuracy measured during training
    assert cli("eval", out, "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acc"] == pytest.approx(summary["final_test_acc"])


def test_simkd_resume_is_exact(teacher_run, tmp_path, cli):
    cfg = CONFIGS / "mnist1d" / "student_simkd.yaml"
    args = [*SMALL, f"teacher.checkpoint={teacher_run}"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli("distill", cfg, *args, "train.epochs=2", "--out", full, "--quiet") == 0
    assert cli("distill", cfg, *args, "train.epochs=1", "--out", part, "--quiet") == 0
    assert cli("distill", "--resume", "--out", part, "train.epochs=2", "--quiet") == 0
    a, b = ck.load_weights_file(full / "model.safetensors"), ck.load_weights_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
