"""The logit-distillation methods: registry, parameter schemas, weighting recipes, DKD warm-up, CTKD's learned
temperature and gradient reversal, MLKD on one view, recipes, and short end-to-end runs through the engine."""

from __future__ import annotations

import math

import pytest
import torch
from _logit_reference import release_mlkd
from conftest import CONFIGS, SMALL
from pydantic import ValidationError

from kdlab import losses as L
from kdlab.methods import METHODS, build_method
from kdlab.models.base import ModelOutput

LOGIT_METHODS = ["ce", "kd", "kd_inf", "lm", "mse", "dkd", "ctkd", "mlkd"]
B, K = 8, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def out(seed: int, scale: float = 3.0, requires_grad: bool = False) -> ModelOutput:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, K, generator=g, dtype=torch.float64) * scale).requires_grad_(requires_grad)
    return ModelOutput(z, torch.zeros(B, 4, dtype=torch.float64), torch.zeros(B, 4, dtype=torch.float64))


def target(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(seed))


def test_every_logit_method_is_registered_and_documents_and_bounds_its_params():
    for name in LOGIT_METHODS:
        cls = METHODS.get(name)
        for pname, field in cls.Params.model_fields.items():
            assert field.description, f"{name}.{pname} has no description"
        with pytest.raises(ValidationError):
            cls.Params(no_such_key=1)
    for name in ["kd", "dkd"]:
        with pytest.raises(ValidationError):
            build_method(name, {"temperature": 0})
    for bad in [{"t_start": 0}, {"t_range": -1}, {"mode": "batch"}, {"decay_epochs": -1}]:
        with pytest.raises(ValidationError):
            build_method("ctkd", bad)
    for bad in [{"temperatures": [4, 0]}, {"temperatures": []}, {"mask_mode": "topk"}]:
        with pytest.raises(ValidationError):
            build_method("mlkd", bad)
    with pytest.raises(ValidationError):
        build_method("kd", {"standardize": "minmax"})


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("kd", {}, lambda s, t, y: {"kd": 0.9 * L.kd(s, t, 4.0), "ce": 0.1 * L.cross_entropy(s, y)}),
        (
            "kd",
            {"temperature": 2, "kd_weight": 9, "standardize": "zscore"},
            lambda s, t, y: {"kd": 9 * L.kd(s, t, 2.0, standardize="zscore"), "ce": 0.1 * L.cross_entropy(s, y)},
        ),
        (
            "kd",
            {"scale": "max", "temperature": 0.5, "ce_weight": 0},
            lambda s, t, y: {"kd": 0.9 * L.kd(s, t, 0.5, "max")},
        ),
        ("kd_inf", {}, lambda s, t, y: {"kd_inf": L.kd_inf(s, t)}),
        ("lm", {"ce_weight": 0.5}, lambda s, t, y: {"lm": L.lm(s, t), "ce": 0.5 * L.cross_entropy(s, y)}),
        ("mse", {}, lambda s, t, y: {"mse": L.mse(s, t)}),
        ("mse", {"reduction": "sum", "standardize": "center"}, lambda s, t, y: {"mse": L.mse(s, t, "sum", "center")}),
        ("dkd", {}, lambda s, t, y: {"dkd": L.dkd(s, t, y), "ce": L.cross_entropy(s, y)}),
    ],
)
def test_methods_return_the_named_weighted_terms(name, params, expected):
    s, t, y = out(1), out(2), target()
    terms = build_method(name, params).losses(s, t, y, epoch=25)
    want = expected(s.logits, t.logits, y)
    assert terms.keys() == want.keys()
    for k in want:
        assert torch.allclose(terms[k], want[k], rtol=1e-12), k


def test_standardize_params_reach_the_loss():
    s, t, y = out(3), out(4), target()
    m = build_method("kd", {"standardize": "zscore", "std_ddof": 0, "std_eps": 0.0, "ce_weight": 0})
    alg1 = L.kd(s.logits, t.logits, 4.0, standardize=lambda z: L.zscore(z, ddof=0, eps=0.0))
    assert torch.allclose(m.losses(s, t, y, 1)["kd"], 0.9 * alg1, rtol=1e-12)
    default = build_method("kd", {"standardize": "zscore", "ce_weight": 0}).losses(s, t, y, 1)["kd"]
    assert not torch.allclose(default, 0.9 * alg1, rtol=1e-9)  # ddof 1 vs 0 changes the value


def test_dkd_warmup_is_min_epoch_over_20():
    s, t, y = out(5), out(6), target()
    m = build_method("dkd", {"ce_weight": 0})
    full = L.dkd(s.logits, t.logits, y)
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (20, 1.0), (200, 1.0)]:
        assert m.losses(s, t, y, epoch)["dkd"].item() == pytest.approx(factor * full.item(), rel=1e-12)
    nowarm = build_method("dkd", {"warmup_epochs": 0, "gt_offset": None, "alpha": 9, "beta": 72, "temperature": 2})
    exact = L.dkd(s.logits, t.logits, y, 9, 72, 2.0, gt_offset=None)
    assert nowarm.losses(s, t, y, 1)["dkd"].item() == pytest.approx(exact.item(), rel=1e-12)


def test_ctkd_global_temperature_starts_at_release_value_and_ascends_the_kd_loss():
    m = build_method("ctkd", {"ce_weight": 0}).double()
    theta = m.temperature_module.theta
    assert [n for n, _ in m.named_parameters()] == ["temperature_module.theta"]
    assert "temperature_module.theta" in m.state_dict()  # checkpointed and resumed by the engine
    s, t, y = out(7, requires_grad=True), out(8), target()
    temp = m.temperature(s.logits, t.logits, epoch=12)
    assert temp.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    for epoch, lam in [(0, 0.0), (5, -0.5), (12, -1.0)]:
        m.zero_grad()
        kd = m.losses(s, t, y, epoch)["kd"]
        kd.backward()
        theta_plain = theta.detach().clone().requires_grad_(True)
        (g_plain,) = torch.autograd.grad(0.9 * L.kd(s.logits, t.logits, L.ctkd_temperature(theta_plain)), theta_plain)
        assert theta.grad.item() == pytest.approx(lam * g_plain.item(), abs=1e-14)
    # one SGD step at λ = −1 increases the KD loss through θ (adversarial), while the student's gradient is plain KD
    before = m.losses(s, t, y, 12)["kd"].item()
    with torch.no_grad():
        theta -= 10.0 * theta.grad
    assert m.losses(s, t, y, 12)["kd"].item() > before
    s.logits.grad = None
    m.losses(s, t, y, 12)["kd"].backward()
    t_now = L.ctkd_temperature(theta.detach())
    (g_student,) = torch.autograd.grad(0.9 * L.kd(s.logits, t.logits, t_now), s.logits)
    assert torch.allclose(s.logits.grad, g_student, atol=1e-12)


def test_ctkd_instance_temperature_is_per_sample_in_range_and_trained_by_reversal_only():
    torch.manual_seed(0)
    m = build_method("ctkd", {"mode": "instance", "hidden": 16, "ce_weight": 0})

    class Net(torch.nn.Module):
        def forward_features(self, x):
            z = x @ torch.ones(3, K)
            return ModelOutput(z, x, x)

    m.setup(Net(), None, torch.randn(2, 3))
    m.double()
    s, t, y = out(9, requires_grad=True), out(10), target()
    temp = m.temperature(s.logits, t.logits, epoch=20)
    assert temp.shape == (B,) and (temp > 1).all() and (temp < 21).all() and temp.std() > 0
    m.losses(s, t, y, 20)["kd"].backward()
    (g_student,) = torch.autograd.grad(0.9 * L.kd(s.logits, t.logits, temp.detach()), s.logits)
    assert torch.allclose(s.logits.grad, g_student, atol=1e-12)  # no reversed gradient leaks into the student
    # λ = −1: every MLP weight receives minus its plain KD gradient
    w = m.temperature_module.mlp[0].weight
    x = torch.cat([t.logits, s.logits], 1).detach()
    temp_plain = L.ctkd_temperature(m.temperature_module.mlp(x).squeeze(1))
    (g_plain,) = torch.autograd.grad(0.9 * L.kd(s.logits.detach(), t.logits, temp_plain), w)
    assert g_plain.abs().max() > 0 and torch.allclose(w.grad, -g_plain, atol=1e-12)


def test_mlkd_method_is_the_release_with_the_engines_view_as_weak_and_strong():
    s, t, y = out(11), out(12), target()
    terms = build_method("mlkd", {}).losses(s, t, y, 1)
    ref = release_mlkd(s.logits, s.logits, t.logits, t.logits, y)
    assert terms.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(terms[k], ref[k], rtol=1e-12), k
    z = build_method("mlkd", {"temperatures": [2, 3, 5, 2, 6], "kd_weight": 9, "standardize": "zscore"})
    ref = release_mlkd(s.logits, s.logits, t.logits, t.logits, y, T=2.0, kd_w=9.0, logit_stand=True)
    for k, v in z.losses(s, t, y, 1).items():
        assert torch.allclose(v, ref[k], rtol=1e-12), k


def test_shipped_mnist1d_recipes_of_the_logit_methods_are_valid(tmp_path):
    from kdlab.config import load_config

    names = [
        "kd", "kd_zscore", "kd_inf", "lm", "mse", "dkd", "dkd_zscore", "ctkd", "ctkd_zscore", "mlkd", "mlkd_zscore",
    ]  # fmt: skip
    for name in names:
        cfg = load_config(CONFIGS / "mnist1d" / f"student_{name}.yaml", [f"teacher.checkpoint={tmp_path}"])
        build_method(cfg.method.name, cfg.method.params())
    dkd_z = load_config(CONFIGS / "mnist1d" / "student_dkd_zscore.yaml", [f"teacher.checkpoint={tmp_path}"]).method
    assert (dkd_z.alpha, dkd_z.beta, dkd_z.temperature, dkd_z.ce_weight) == (9.0, 72.0, 2.0, 1.0)
    kd_z = load_config(CONFIGS / "mnist1d" / "student_kd_zscore.yaml", [f"teacher.checkpoint={tmp_path}"]).method
    assert (kd_z.temperature, kd_z.kd_weight, kd_z.ce_weight, kd_z.standardize) == (2.0, 9.0, 0.1, "zscore")


@pytest.mark.parametrize(
    "recipe,over",
    [("dkd_zscore", []), ("ctkd", []), ("ctkd", ["method.mode=instance"]), ("mlkd", ["optim.lr=0.01"]), ("kd_inf", [])],
)
def test_end_to_end_distillation(recipe, over, teacher_run, tmp_path):
    from kdlab.config import load_config
    from kdlab.engine import run
    from kdlab.engine import checkpoint as ck

    cfg = load_config(
        CONFIGS / "mnist1d" / f"student_{recipe}.yaml",
        SMALL + ["train.epochs=1", f"teacher.checkpoint={teacher_run}", *over],
    )
    res = run(cfg, tmp_path / "run")
    assert math.isfinite(res.summary["final_test_acc"]) and res.summary["final_test_acc"] > 10
    if recipe == "ctkd":
        state = ck.load_latest(tmp_path / "run" / "checkpoints")
        keys = [k for k in state.tensors if k.startswith("method.temperature_module.")]
        assert keys  # the learned temperature is checkpointed
