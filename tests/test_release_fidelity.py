"""Issue 22: the behaviours around the methods follow the released code by default. Each test computes the release's
value with its own conventions (our transcription of mdistiller a08d46f, RepDistiller b84f547, CAT-KD 4467073, WSLD
67820dd, overhaul-distillation 76344a8), in float64 with a fixed seed, and compares it with kdlab's."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdlab import Distiller
from kdlab.errors import ConfigError
from kdlab.methods import build_method
from kdlab.models import build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def f64():
    """Models and tensors built in float64 (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _calibrated(name: str, classes: int = 10, seed: int = 1) -> nn.Module:
    """A zoo model whose BatchNorm running statistics were set by a few training-mode passes (a random teacher's
    are 0 / 1, which would make batch and running statistics look alike)."""
    torch.manual_seed(seed)
    model = build(name, num_classes=classes)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return model.eval().requires_grad_(False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------------
# 1, 2: the teacher's BatchNorm in training mode (OFD, WSLD)


def _release_ofd(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """mdistiller ``feat_loss``."""
    loss = ((s - margin) ** 2 * ((s > margin) & (t <= margin)) + (s - t) ** 2 * ((s > t) & (t > margin) & (t <= 0))
            + (s - t) ** 2 * (t > 0))  # fmt: skip
    return loss.abs().mean(0).sum()


def test_ofd_teacher_runs_on_batch_statistics_as_released_and_its_state_never_changes(f64):
    teacher, x, y = _calibrated("resnet14"), torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    torch.manual_seed(2)
    student = build("resnet8", num_classes=10)
    before = _state(teacher)
    d = Distiller(student, teacher, "ofd").train()
    step = d(x, y)
    assert _same(before, _state(teacher)) and not teacher.training  # nothing of the teacher moved, not even counters
    # the release: OFD.train(True) puts the teacher in training mode, so its pre-activations use batch statistics
    released = copy.deepcopy(teacher).train()
    with torch.no_grad():
        t_pre = released.forward_features(x).preacts
    s_pre = student.forward_features(x).preacts
    n = len(t_pre)
    ref = sum(_release_ofd(conn(s), F.adaptive_avg_pool2d(t, s.shape[-2:]), getattr(d.method, f"margin{i}"))
              / 2 ** (n - i - 1) for i, (s, t, conn) in enumerate(zip(s_pre, t_pre, d.method.connectors)))  # fmt: skip
    torch.testing.assert_close(step.terms["feature"], 0.001 * ref, rtol=1e-12, atol=0)
    # teacher_bn=eval keeps the running statistics: another value (so the test above would notice the mode)
    eval_step = Distiller(student, teacher, "ofd", teacher_bn="eval").train()
    eval_step.setup(x)
    eval_step.method.load_state_dict(d.method.state_dict())
    assert abs(float(eval_step(x, y).terms["feature"].detach() / step.terms["feature"].detach()) - 1) > 1e-3


def _release_wsld(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, T: float = 2.0, alpha: float = 2.5) -> tuple:
    """WSLD ``WSLDistiller.forward`` (hard loss, alpha × soft loss)."""
    soft = -(F.softmax(t / T, 1) * F.log_softmax(s / T, 1)).sum(1, keepdim=True)
    onehot = F.one_hot(y, s.shape[1]).to(s)
    ce_s = -(onehot * F.log_softmax(s.detach(), 1)).sum(1, keepdim=True)
    ce_t = -(onehot * F.log_softmax(t.detach(), 1)).sum(1, keepdim=True)
    w = 1 - torch.exp(-torch.clamp(ce_s / (ce_t + 1e-7), min=0))
    return F.cross_entropy(s, y), alpha * T**2 * (w * soft).mean()


def test_wsld_teacher_logits_come_from_batch_statistics_as_released(f64):
    teacher, x, y = _calibrated("resnet14"), torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    torch.manual_seed(2)
    student = build("resnet8", num_classes=10)
    before = _state(teacher)
    step = Distiller(student, teacher, "wsld").train()(x, y)
    assert _same(before, _state(teacher))
    with torch.no_grad():  # train_with_distillation.py: d_net.module.t_net.train()
        t_logits = copy.deepcopy(teacher).train()(x)
    hard, soft = _release_wsld(student(x), t_logits, y)
    torch.testing.assert_close(step.terms["ce"], hard, rtol=1e-12, atol=0)
    torch.testing.assert_close(step.terms["wsld"], soft, rtol=1e-12, atol=0)
    with torch.no_grad():
        _, soft_eval = _release_wsld(student(x), teacher(x), y)
    assert abs(float(soft_eval / soft.detach()) - 1) > 1e-3


def test_the_engine_runs_the_teacher_on_batch_statistics_without_folding_or_updating_it(tmp_path):
    from kdlab.config import load_config
    from kdlab.engine import Trainer
    from kdlab.engine.checkpoint import save_weights
    from kdlab.engine.evaluation import evaluate_split
    from kdlab.models.fold import BatchStatisticsNorm

    save_weights(tmp_path / "t.safetensors", _calibrated("resnet14").state_dict())
    raw = {"data": {"name": "synthetic", "num_samples": 64, "num_classes": 10}, "model": {"name": "resnet8"},
           "teacher": {"name": "resnet14", "checkpoint": str(tmp_path / "t.safetensors")}, "method": {"name": "ofd"},
           "train": {"epochs": 1, "batch_size": 16, "progress": False, "threads": 1}}  # fmt: skip
    logs: list[str] = []
    trainer = Trainer(load_config(None, [], base=raw), tmp_path / "run", log=logs.append)
    before = _state(trainer.teacher)
    summary = trainer.run().summary
    assert _same(before, _state(trainer.teacher))
    forward = trainer._teacher_fwd.model  # the batch-statistics copy: every BatchNorm replaced, nothing folded
    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trainer.teacher.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in forward.modules())
    assert sum(isinstance(m, BatchStatisticsNorm) for m in forward.modules()) == norms > 10
    assert any("BatchNorms on each batch's statistics (not folded)" in m for m in logs)
    # the teacher's accuracy is still its eval-mode one (running statistics)
    ev = evaluate_split(lambda v: trainer.teacher(v), trainer.data, "test", 1000)
    assert summary["teacher_test_acc"] == pytest.approx(ev["acc"])


class _UserNet(nn.Module):
    """A user model whose stages are named by their BatchNorms (pre-activations and OFD's margins)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_batch_statistics_teacher_keeps_a_user_models_batchnorm_taps(f64):
    torch.manual_seed(10)
    teacher, student, x = _UserNet(8), _UserNet(4), torch.randn(6, 3, 8, 8) * 2 + 1
    with torch.no_grad():
        teacher(x)  # running statistics away from 0 / 1
    taps = {"classifier": "fc", "features": ["bn1", "bn2"]}
    d = Distiller(student, teacher.eval(), "ofd", student_taps=taps, teacher_taps=taps).train()
    d.setup(x)
    got = d.teacher_outputs(x).preacts
    released = copy.deepcopy(teacher).train()
    with torch.no_grad():
        h1 = released.bn1(released.conv1(x))
        want = (h1, released.bn2(released.conv2(torch.relu(h1))))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(d(x, torch.arange(6)).loss)


@pytest.mark.parametrize("method", ["wsld", "ofd"])
def test_a_teacher_cache_cannot_replay_batch_statistics(method, tmp_path):
    from kdlab.engine.teacher_cache import cache_refusal

    m = build_method(method, {})
    assert m.teacher_bn == "train"
    refusal = cache_refusal(method, m)
    assert refusal is not None and "\n" not in refusal
    if method == "wsld":  # (OFD's stage features are refused first)
        assert "cannot replay" in refusal and "method.teacher_bn=eval" in refusal
        assert cache_refusal(method, build_method(method, {"teacher_bn": "eval"})) is None


def test_sweeps_keep_a_batch_statistics_teacher_live(tmp_path):
    from conftest import CONFIGS
    from kdlab.config import load_config
    from kdlab.pipelines.plan_cache import with_cache

    recipe = CONFIGS / "mnist1d" / "student_kd.yaml"
    assert with_cache(load_config(recipe, ["method.name=wsld"]), tmp_path, 1).teacher.cache is None
    assert with_cache(load_config(recipe, ["method.name=wsld", "method.teacher_bn=eval"]), tmp_path, 1).teacher.cache


# --------------------------------------------------------------------------------------------------------------------
# 3: CAT-KD's student classifier


def test_catkd_student_classifier_is_the_releases_bias_free_conv(f64):
    teacher, x, y = _calibrated("resnet14"), torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    torch.manual_seed(3)
    student = build("resnet8", num_classes=10)
    d = Distiller(student, teacher, "catkd").train()
    opt = torch.optim.SGD(d.setup(x).parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):
        step = d(x, y)
        opt.zero_grad()
        step.loss.backward()
        opt.step()
    fc = student.classifier
    assert torch.count_nonzero(fc.bias) == 0 and not fc.bias.requires_grad  # held at 0 through training
    # ResNet_test: logits = avgpool(conv_test(feat)), conv_test a 1×1 conv without bias
    feat = student.forward_features(x).prepool
    released = F.avg_pool2d(F.conv2d(feat, fc.weight[:, :, None, None]), feat.shape[-1]).flatten(1)
    torch.testing.assert_close(d(x, y).logits, released, rtol=1e-12, atol=1e-12)
    # their kaiming_normal_(fan_out) draw: N(0, 2/K) for K classes (6,400 weights here; PyTorch's default would give
    # a standard deviation of 1/√(3·64) = 0.072, not 0.141)
    torch.manual_seed(4)
    fresh = build("resnet8", num_classes=100)
    build_method("catkd", {}).setup(fresh, build("resnet8", num_classes=100), x[:2])
    assert fresh.classifier.weight.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.04)


def test_catkd_keeps_shufflenet_weights_and_the_option_keeps_the_bias():
    torch.manual_seed(5)
    student, teacher, x = build("ShuffleV1", num_classes=10), build("resnet8", num_classes=10), torch.randn(2, 3, 32, 32)
    w = student.classifier.weight.clone()
    build_method("catkd", {}).setup(student, teacher, x)
    assert torch.equal(student.classifier.weight, w) and torch.count_nonzero(student.classifier.bias) == 0
    other = build("resnet8", num_classes=10)
    b = other.classifier.bias.clone()
    build_method("catkd", {"release_classifier": False}).setup(other, teacher, x)
    assert torch.equal(other.classifier.bias, b) and other.classifier.bias.requires_grad


# --------------------------------------------------------------------------------------------------------------------
# 4, 6: FitNet hints stage 2 through the releases' ConvReg


def test_fitnet_defaults_to_stage_2_and_upsamples_a_shufflenet_hint_as_released(f64):
    torch.manual_seed(6)
    teacher, student = build("resnet8x4", num_classes=10).eval(), build("ShuffleV1", num_classes=10)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    d = Distiller(student, teacher, "fitnet").train()  # no parameters: the releases' defaults
    step = d(x, y)
    assert d.method.params.hint_layer == 2 and d.method.teacher_outputs == ("stages",)
    conv, bn, _ = d.method.connector
    assert type(conv) is nn.ConvTranspose2d and (conv.kernel_size, conv.stride, conv.padding) == ((4, 4), (2, 2), (1, 1))
    # mdistiller / RepDistiller: f_s = ConvReg(feats_s[2]) (transposed conv, BN in training mode, ReLU), MSE against
    # the teacher's feats[2] as it is (16×16: not pooled)
    s2, t2 = student.forward_features(x).stages[1], teacher.forward_features(x).stages[1]
    assert s2.shape[-1] == 8 and t2.shape[-1] == 16
    f_s = F.relu(F.batch_norm(F.conv_transpose2d(s2, conv.weight, conv.bias, stride=2, padding=1), None, None,
                              bn.weight, bn.bias, True, 0.0, bn.eps))  # fmt: skip
    torch.testing.assert_close(step.terms["feature"], 100 * F.mse_loss(f_s, t2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("s_shape, t_shape, kind, geometry", [
    ((8, 16, 16), (16, 8, 8), nn.Conv2d, ((3, 3), (2, 2), (1, 1))),
    ((8, 8, 8), (16, 16, 16), nn.ConvTranspose2d, ((4, 4), (2, 2), (1, 1))),
    ((8, 10, 10), (16, 8, 8), nn.Conv2d, ((3, 3), (1, 1), (0, 0))),
    ((8, 8, 8), (16, 8, 8), nn.Conv2d, ((1, 1), (1, 1), (0, 0))),
    ((8, 4, 4), (16, 12, 12), nn.Conv2d, ((1, 1), (1, 1), (0, 0))),  # the releases refuse: 1×1, teacher pooled
])  # fmt: skip
def test_conv_regressor_geometry(s_shape, t_shape, kind, geometry):
    from kdlab.models.connectors import align_teacher, conv_regressor

    s, t = torch.randn(2, *s_shape), torch.randn(2, *t_shape)
    reg = conv_regressor(s, t)
    conv = reg[0]
    assert type(conv) is kind and (conv.kernel_size, conv.stride, conv.padding) == geometry and conv.bias is not None
    assert isinstance(reg[1], nn.BatchNorm2d) and isinstance(reg[2], nn.ReLU)
    out = reg(s)
    assert out.shape[1] == t.shape[1] and align_teacher(t, out).shape == out.shape
    assert len(conv_regressor(s, t, relu=False)) == 2


def test_fitnet_on_models_without_two_stages_is_a_one_line_error():
    d = Distiller(nn.Sequential(nn.Linear(8, 4)), nn.Sequential(nn.Linear(8, 4)), "fitnet")
    with pytest.raises(ConfigError, match=r"hint_layer=2 .* exposes 0 stage.*method.hint_layer=null"):
        d.setup(torch.randn(3, 8))


# --------------------------------------------------------------------------------------------------------------------
# 5: VID's variances


def _release_vid(f_s: torch.Tensor, f_t: torch.Tensor, regressor: nn.Module, log_scale: torch.Tensor) -> torch.Tensor:
    """mdistiller / RepDistiller ``vid_loss`` (maps of equal size)."""
    mean = regressor(f_s)
    var = (torch.log(1.0 + torch.exp(log_scale)) + 1e-5).view(1, -1, 1, 1)
    return torch.mean(0.5 * ((mean - f_t) ** 2 / var + torch.log(var)))


@pytest.mark.parametrize("train_variance", [True, False])
def test_vid_variances_train_as_repdistiller_or_stay_as_mdistiller(train_variance, f64):
    teacher, x, y = _calibrated("resnet14"), torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    torch.manual_seed(7)
    student = build("resnet8", num_classes=10)
    d = Distiller(student, teacher, "vid", train_variance=train_variance).train()
    opt = torch.optim.SGD(d.setup(x).parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    init = [p.detach().clone() for p in d.method.log_scales]
    assert torch.allclose(F.softplus(init[0]) + 1e-5, torch.full_like(init[0], 5.0), rtol=1e-12)  # σ² = 5
    step = d(x, y)
    s_out, t_out = student.forward_features(x), teacher.forward_features(x)
    ref = sum(_release_vid(s, t, reg, ls) for s, t, reg, ls in zip(s_out.stages, t_out.stages, d.method.regressors,
                                                                    init))  # fmt: skip
    torch.testing.assert_close(step.terms["vid"], ref, rtol=1e-12, atol=0)
    opt.zero_grad()
    step.loss.backward()
    opt.step()
    moved = [not torch.equal(p, q) for p, q in zip(d.method.log_scales, init)]
    assert all(moved) if train_variance else not any(moved)


def test_every_vid_recipe_says_which_release_it_follows():
    from conftest import CONFIGS
    from kdlab.config import load_config

    recipes = [p for p in CONFIGS.rglob("*.yaml") if "name: vid" in p.read_text()]
    assert len(recipes) >= 8
    for path in recipes:
        head = path.read_text().splitlines()[0]
        assert "RepDistiller" in head or "mdistiller" in head, path
        cfg = load_config(path)
        assert cfg.method.train_variance == ("RepDistiller" in head), path


# --------------------------------------------------------------------------------------------------------------------
# 7: FT's paraphraser phase uses RepDistiller's init optimizer


def test_pre_phase_hyperparameters_step_like_repdistillers_init_optimizer(f64):
    from kdlab.config import OptimConfig
    from kdlab.engine.optim import build_optimizer, set_epoch_hyperparameters

    torch.manual_seed(8)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ref = copy.deepcopy(net)
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, no_decay_norm=True)
    opt = build_optimizer(cfg, net)
    assert len(opt.param_groups) == 2  # the kl-vs-mse recipes' BatchNorm exemption
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)  # helper/pretrain.py
    pre = build_method("ft", {}).pre_optim
    for _ in range(3):
        set_epoch_hyperparameters(opt, cfg, 0.01, pre)
        xb = torch.randn(8, 4)
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            model(xb).square().mean().backward()
            o.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    set_epoch_hyperparameters(opt, cfg, 0.1)  # the main phase: the run's settings again
    assert [(g["nesterov"], g["weight_decay"]) for g in opt.param_groups] == [(True, 5e-4), (True, 0.0)]


def test_ft_pre_phase_learning_rate_follows_the_student_and_needs_sgd():
    from kdlab.config import OptimConfig
    from kdlab.engine.optim import build_optimizer

    x = torch.randn(2, 3, 32, 32)
    teacher = build("resnet14", num_classes=10)
    for student, lr in (("resnet8", 0.01), ("wrn_16_1", 0.01), ("vgg8", 0.05), ("ShuffleV1", 0.05)):
        m = build_method("ft", {})
        m.setup(build(student, num_classes=10), teacher, x)
        assert m.pre_lr(0.05) == lr, student
    assert build_method("ft", {"init_lr": 0.02}).pre_lr(0.05) == 0.02
    assert build_method("ft", {"init_lr": None}).pre_lr(0.05) == 0.05
    with pytest.raises(ConfigError, match="pre-phase trains with SGD as released"):
        build_optimizer(OptimConfig(name="adamw", lr=1e-3), build_method("ft", {}))
    build_optimizer(OptimConfig(name="adamw", lr=1e-3), nn.Linear(2, 2), build_method("ft", {"init_optim": "run"}))


def test_ft_run_switches_optimizer_settings_between_phases(tmp_path):
    from kdlab.config import load_config
    from kdlab.engine import Trainer
    from kdlab.engine.callbacks import Callback
    from kdlab.engine.checkpoint import save_weights

    class Groups(Callback):
        seen: list = []

        def on_epoch_end(self, trainer, epoch):
            self.seen.append([(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"])
                              for g in trainer.optimizer.param_groups])  # fmt: skip
            return {}

    torch.manual_seed(9)
    save_weights(tmp_path / "t.safetensors", build("resnet14", num_classes=10).state_dict())
    raw = {"data": {"name": "synthetic", "num_samples": 32, "num_classes": 10}, "model": {"name": "resnet8"},
           "teacher": {"name": "resnet14", "checkpoint": str(tmp_path / "t.safetensors")},
           "method": {"name": "ft", "init_epochs": 1},
           "optim": {"lr": 0.1, "nesterov": True, "weight_decay": 5e-4, "no_decay_norm": True},
           "schedule": {"name": "constant"}, "train": {"epochs": 1, "batch_size": 16, "progress": False, "threads": 1}}
    Trainer(load_config(None, [], base=raw), tmp_path / "run", callbacks=[Groups()]).run()
    pre, main = Groups.seen
    assert pre == [(0.01, 0.9, False, 5e-4)] * 2
    assert main == [(0.1, 0.9, True, 5e-4), (0.1, 0.9, True, 0.0)]
