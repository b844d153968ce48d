"""Multi-stage features (zoo stages / pre-activations, user-model stage taps) and the methods at, sp, nst, ft, ab, ofd,
reviewkd and FitNet's intermediate hint.

The losses are compared with float64 references written here from the released conventions (loops and explicit
formulas, not the library's code), in value and in gradient.
"""

from __future__ import annotations

import ast
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.config import load_config
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.errors import ConfigError
from kdlab.methods import build_method
from kdlab.models import build
from kdlab.models.shufflenet import channel_shuffle
from kdlab.models.taps import TappedModel

from conftest import REPO

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64

# --------------------------------------------------------------------------------------------------------------------
# float64 references, written from the conventions of the releases


def _block_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average pooling to size (×size) when the height is a multiple of it (= adaptive pooling in that case)."""
    k = x.shape[2] // size
    if x.dim() == 3:
        return x.reshape(x.shape[0], x.shape[1], size, k).mean(3)
    return x.reshape(x.shape[0], x.shape[1], size, k, size, k).mean(dim=(3, 5))


def _heights(s, t):
    if s.shape[2] > t.shape[2]:
        s = _block_pool(s, t.shape[2])
    elif t.shape[2] > s.shape[2]:
        t = _block_pool(t, s.shape[2])
    return s, t


def at_ref(s, t, p=2.0):
    s, t = _heights(s, t)

    def amap(f):
        rows = []
        for i in range(f.shape[0]):
            a = sum(f[i, c] ** p for c in range(f.shape[1])) / f.shape[1]
            a = a.reshape(-1)
            rows.append(a / torch.clamp(torch.sqrt((a * a).sum()), min=1e-12))
        return torch.stack(rows)

    d = amap(s) - amap(t)
    return (d * d).sum() / d.numel()


def sp_ref(s, t):
    b = s.shape[0]

    def gram(f):
        f = f.reshape(b, -1)
        g = torch.stack([torch.stack([(f[i] * f[j]).sum() for j in range(b)]) for i in range(b)])
        return torch.stack([g[i] / torch.clamp(g[i].norm(), min=1e-12) for i in range(b)])

    return ((gram(t) - gram(s)) ** 2).sum() / b**2


def nst_ref(s, t):
    s, t = _heights(s, t)

    def unit(f):
        f = f.reshape(f.shape[0], f.shape[1], -1)
        return f / f.norm(dim=2, keepdim=True).clamp_min(1e-12)

    s, t = unit(s), unit(t)

    def k(a, b):
        return torch.einsum("bih,bjh->bij", a, b).pow(2).mean()

    return k(t, t) + k(s, s) - 2 * k(s, t)


def hcl_ref(ss, ts):
    total = 0.0
    for s, t in zip(ss, ts):
        h = s.shape[2]
        sizes = [size for size in (4, 2, 1) if size < h]
        weights = [0.5 ** (i + 1) for i in range(len(sizes))]
        loss = ((s - t) ** 2).mean()
        loss = loss + sum(w * ((_block_pool(s, z) - _block_pool(t, z)) ** 2).mean() for w, z in zip(weights, sizes))
        total = total + loss / (1 + sum(weights))
    return total


def ab_ref(s, t, m=1.0):
    out = torch.where((s > -m) & (t <= 0), (s + m) ** 2, torch.zeros_like(s))
    out = out + torch.where((s <= m) & (t > 0), (s - m) ** 2, torch.zeros_like(s))
    return out.sum() / s.shape[0]


def ofd_ref(s, t, m):
    m = m.expand_as(s)
    a = torch.where((s > m) & (t <= m), (s - m) ** 2, torch.zeros_like(s))
    b = torch.where((s > t) & (t > m) & (t <= 0), (s - t) ** 2, torch.zeros_like(s))
    c = torch.where(t > 0, (s - t) ** 2, torch.zeros_like(s))
    return (a + b + c).sum() / s.shape[0]


def _same_value_and_grad(fn, ref, s, t, *args):
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    v1, v2 = fn(s1, t, *args), ref(s2, t, *args)
    (g1,) = torch.autograd.grad(v1, s1)
    (g2,) = torch.autograd.grad(v2, s2)
    assert v1.dtype == D and torch.allclose(v1, v2, rtol=1e-10, atol=1e-12), (float(v1), float(v2))
    assert torch.allclose(g1, g2, rtol=1e-8, atol=1e-12)


g = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=g, dtype=D)


@pytest.mark.parametrize("s_shape, t_shape", [((4, 3, 8, 8), (4, 5, 4, 4)), ((4, 6, 4, 4), (4, 2, 8, 8)),
                                              ((3, 4, 4, 4), (3, 7, 4, 4)), ((4, 3, 8), (4, 6, 4)),
                                              ((3, 12, 2, 2), (3, 20, 4, 4))])  # fmt: skip
def test_at_and_nst_match_the_released_conventions(s_shape, t_shape):
    s, t = _r(*s_shape), _r(*t_shape)
    for p in (2.0, 3.0):
        _same_value_and_grad(L.at, at_ref, s, t, p)
    _same_value_and_grad(L.nst, nst_ref, s, t)
    assert torch.autograd.gradcheck(lambda x: L.at(x, t), (s.clone().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda x: L.nst(x, t), (s.clone().requires_grad_(True),))
    assert float(L.at(t, t)) == 0.0 and abs(float(L.nst(t, t))) < 1e-12


def test_sp_matches_the_released_convention_for_maps_and_vectors():
    for s, t in ((_r(5, 3, 4, 4), _r(5, 8, 2, 2)), (_r(6, 10), _r(6, 3, 4))):
        _same_value_and_grad(L.sp, sp_ref, s, t)
        assert torch.autograd.gradcheck(lambda x: L.sp(x, t), (s.clone().requires_grad_(True),))
    with pytest.raises(ValueError, match="batch"):
        L.sp(_r(4, 3), _r(5, 3))


def test_hcl_matches_the_released_convention():
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 6, 1, 1), (2, 3, 8)]
    ss, ts = [_r(*x) for x in shapes], [_r(*x) for x in shapes]
    _same_value_and_grad(lambda s0, t, *a: L.hcl([s0] + ss[1:], ts), lambda s0, t, *a: hcl_ref([s0] + ss[1:], ts),
                         ss[0], ts[0])  # fmt: skip
    assert torch.allclose(L.hcl(ss, ts), hcl_ref(ss, ts), rtol=1e-12)
    # per stage: weights 1, 0.5, 0.25, 0.125 for an 8×8 map, divided by their sum
    s, t = _r(1, 1, 8, 8), torch.zeros(1, 1, 8, 8, dtype=D)
    terms = [(s**2).mean()] + [(_block_pool(s, z) ** 2).mean() for z in (4, 2, 1)]
    assert torch.allclose(L.hcl([s], [t]), (terms[0] + terms[1] / 2 + terms[2] / 4 + terms[3] / 8) / 1.875)
    with pytest.raises(ValueError, match="stages"):
        L.hcl(ss, ts[:-1])


def test_ab_and_ofd_match_the_released_conventions():
    s, t = _r(4, 3, 4, 4), _r(4, 3, 4, 4)
    _same_value_and_grad(L.ab, ab_ref, s, t, 1.0)
    _same_value_and_grad(L.ab, ab_ref, s, t, 0.5)
    m = _r(1, 3, 1, 1) - 1
    _same_value_and_grad(L.ofd, ofd_ref, s, t, m)
    w, b = torch.tensor([1.0, 2.0, 0.5, -1.5], dtype=D), torch.tensor([0.0, 1.0, -3.0, 0.4], dtype=D)
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expect = []
    for wi, bi in zip(w.tolist(), b.tolist()):
        sd = abs(wi)
        if phi(-bi / sd) > 0.001:
            expect.append(-sd * math.exp(-((bi / sd) ** 2) / 2) / math.sqrt(2 * math.pi) / phi(-bi / sd) + bi)
        else:
            expect.append(-3 * sd)
    assert torch.allclose(L.ofd_margin(w, b), torch.tensor(expect, dtype=D), rtol=1e-10)


def test_ab_connectors_follow_repdistillers_geometry():
    """RepDistiller's ConvReg: identity when channels and size agree, 3×3 stride 2 for a student map twice the
    teacher's, a 4×4 stride-2 transposed conv for half, a (1 + s − t) kernel otherwise; always the teacher's shape."""
    from kdlab.methods.ab import ABConnector

    cases = [((8, 16, 16), (8, 16, 16), nn.Identity, None), ((8, 16, 16), (16, 8, 8), nn.Conv2d, ((3, 3), (2, 2))),
             ((8, 8, 8), (16, 16, 16), nn.ConvTranspose2d, ((4, 4), (2, 2))),
             ((8, 10, 10), (16, 8, 8), nn.Conv2d, ((3, 3), (1, 1))), ((8, 8, 8), (16, 8, 8), nn.Conv2d, ((1, 1), (1, 1))),
             ((8, 12), (16, 6), nn.Conv1d, ((3,), (2,)))]  # fmt: skip
    for s_shape, t_shape, kind, geometry in cases:
        s, t = torch.randn(2, *s_shape), torch.randn(2, *t_shape)
        conn = ABConnector(s, t)
        layer = conn.layers if kind is nn.Identity else conn.layers[0]
        assert type(layer) is kind
        if geometry is not None:
            assert (layer.kernel_size, layer.stride) == geometry and layer.bias is not None
            assert isinstance(conn.layers[1], (nn.BatchNorm1d, nn.BatchNorm2d))
        assert conn(s).shape == t.shape


# --------------------------------------------------------------------------------------------------------------------
# the model interface


ZOO = ["resnet8", "resnet8x4", "ResNet50", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "mnist1d_cnn",
       "mnist1d_mlp"]  # fmt: skip


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_exposes_stages_and_preactivations(name):
    torch.manual_seed(0)
    model = build(name, num_classes=10).eval()
    x = torch.randn(2, 40) if name.startswith("mnist1d") else torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        assert torch.equal(out.logits, model(x))
    assert len(out.stages) == len(out.preacts) >= 2
    assert [p.shape for p in out.preacts] == [s.shape for s in out.stages]
    if name == "wrn_16_2":  # pre-activation network: the BN that follows each stage
        assert torch.equal(out.preacts[0], model.block2.layer[0].bn1(out.stages[0]))
        assert torch.equal(F.relu(out.preacts[-1]), out.prepool)
    elif name == "MobileNetV2":  # linear bottlenecks: no ReLU after a stage
        assert all(p is s for p, s in zip(out.preacts, out.stages))
    elif name == "ShuffleV2":  # mdistiller: concatenation before the shuffle
        assert all(torch.equal(channel_shuffle(F.relu(p), 2), s) for p, s in zip(out.preacts, out.stages))
    else:
        assert all(torch.equal(F.relu(p), s) for p, s in zip(out.preacts, out.stages))
    if name.startswith("Shuffle") or name == "mnist1d_mlp":
        with pytest.raises(ConfigError, match="BatchNorm"):
            model.stage_norms()
    else:
        norms = model.stage_norms()
        assert [n.num_features for n in norms] == [p.shape[1] for p in out.preacts]


def test_models_package_has_no_import_cycle():
    """base → heads → connectors → output, imports inside functions included."""
    pkg = REPO / "src" / "kdlab" / "models"
    graph: dict[str, set[str]] = {}
    for path in pkg.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdlab.models."):
                deps.add(node.module.split(".")[2])
        graph[path.stem] = deps
    state: dict[str, int] = {}

    def visit(n, stack):
        if state.get(n) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(stack + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in graph.get(n, ()):
            visit(d, stack + [n])
        state[n] = 2

    for n in graph:
        visit(n, [])
    assert "heads" in graph["base"] and "base" not in graph["heads"] and "base" not in graph["connectors"]


class _Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.layer2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.layer1(F.relu(self.stem(x))))
        x = F.relu(self.layer2(x))
        return self.fc(x.mean(dim=(2, 3)))


class _Tokens(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 16, 8)
        self.block = nn.Linear(8, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        tokens = self.embed(x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], -1, 3 * 16))  # N×T×C
        return self.fc(self.block(tokens).mean(1))


def test_user_model_stage_list_and_single_string():
    x = torch.randn(2, 3, 8, 8)
    many = TappedModel(_Net(), "fc", ["layer1", "layer2"]).eval()
    one = TappedModel(many.model, "fc", "layer2").eval()
    a, b = many.forward_features(x), one.forward_features(x)
    assert [tuple(s.shape) for s in a.stages] == [(2, 8, 8, 8), (2, 16, 4, 4)]
    assert torch.equal(a.prepool, a.stages[-1]) and torch.equal(a.prepool, b.prepool) and len(b.stages) == 1
    bn = TappedModel(many.model, "fc", ["layer1.1", "layer2.1"])
    assert [m.num_features for m in bn.stage_norms()] == [8, 16]
    with pytest.raises(ConfigError, match="BatchNorm"):
        many.stage_norms()
    with pytest.raises(ConfigError, match="'layer9' is not a module"):
        TappedModel(_Net(), "fc", ["layer1", "layer9"])
    with pytest.raises(ConfigError, match="empty"):
        TappedModel(_Net(), "fc", [])


def test_config_names_user_model_stages_as_a_list(tmp_path):
    src = tmp_path / "nets.py"
    src.write_text("from torch import nn\nclass Net(nn.Module):\n    def __init__(self, num_classes=10):\n"
                   "        super().__init__()\n        self.a = nn.Conv2d(3, 4, 3)\n        self.b = nn.Conv2d(4, 6, 3)\n"
                   "        self.fc = nn.Linear(6, num_classes)\n    def forward(self, x):\n"
                   "        return self.fc(self.b(self.a(x)).mean((2, 3)))\n")  # fmt: skip
    raw = {"data": {"name": "synthetic", "num_samples": 40, "num_classes": 10},
           "model": {"name": f"{src}:Net", "classifier": "fc", "features": ["a", "b"]}}  # fmt: skip
    from kdlab.trust import trusting

    with trusting():  # a .py file named in a config: imported only with --trust-code
        cfg = load_config(None, [], base=raw)
        model = build(cfg.model, num_classes=10)
    assert cfg.model.features == ["a", "b"]
    out = model.forward_features(torch.randn(2, 3, 8, 8))
    assert [tuple(t.shape) for t in out.stages] == [(2, 4, 6, 6), (2, 6, 4, 4)] and out.prepool is out.stages[-1]


def test_stage_methods_reject_tokens_vectors_and_missing_stages():
    x = torch.randn(2, 3, 8, 8)
    teacher = TappedModel(_Net(), "fc", ["layer1", "layer2"])
    method = build_method("at", {})
    with pytest.raises(ConfigError, match="token-shaped"):
        method.setup(TappedModel(_Tokens(), "fc", ["embed", "block"]), teacher, x)
    with pytest.raises(ConfigError, match=r"exposes no stage features; .* model.features"):
        build_method("nst", {}).setup(TappedModel(_Net(), "fc"), teacher, x)
    with pytest.raises(ConfigError, match="needs feature maps"):
        build_method("at", {}).setup(build("mnist1d_mlp"), build("mnist1d_cnn"), torch.randn(2, 40))


@pytest.mark.parametrize("name", ["at", "sp", "nst", "ft", "ab", "ofd", "reviewkd"])
def test_methods_on_1d_maps_and_2d_user_models(name):
    """MNIST-1D CNN → CNN (N×C×L maps), and a user model with named stages → a zoo teacher."""
    for student, teacher, x in ((build("mnist1d_cnn"), build("mnist1d_cnn", widths=(16, 48, 96)), torch.randn(8, 40)),
                                (TappedModel(_Net(10), "fc", ["layer1.1", "layer2.1"]), build("resnet8", num_classes=10),
                                 torch.randn(8, 3, 32, 32))):  # fmt: skip
        torch.manual_seed(0)
        method = build_method(name, {})
        method.setup(student, teacher, x)
        with torch.no_grad():
            t_out = teacher.eval().forward_features(x)
        epoch = 0 if method.pre_epochs else 1
        terms = method.losses(student.forward_features(x), t_out, torch.randint(0, 10, (8,)), epoch)
        loss = sum(terms.values())
        assert torch.isfinite(loss)
        loss.backward()
        trained = [p for p in list(student.parameters()) + list(method.parameters()) if p.grad is not None]
        assert trained and all(torch.isfinite(p.grad).all() for p in trained)


@pytest.mark.parametrize("name", ["sp", "ab", "ofd", "reviewkd"])
def test_mlp_student_from_a_cnn_teacher(name):
    """Vector stages: SP as they are, AB / OFD / ReviewKD as length-1 maps; AT, NST and FT refuse them."""
    student, teacher, x = build("mnist1d_mlp"), build("mnist1d_cnn"), torch.randn(8, 40)
    method = build_method(name, {})
    method.setup(student, teacher, x)
    epoch = 0 if method.pre_epochs else 1
    terms = method.losses(student.forward_features(x), teacher.forward_features(x), torch.zeros(8, dtype=torch.long),
                          epoch)  # fmt: skip
    loss = sum(terms.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert student.body[0].weight.grad is not None
    for other in ("at", "nst", "ft"):
        with pytest.raises(ConfigError, match="needs feature maps"):
            build_method(other, {}).setup(student, teacher, x)


def test_fitnet_intermediate_hint():
    student, teacher, x = build("resnet8", num_classes=10), build("resnet20", num_classes=10), torch.randn(2, 3, 32, 32)
    method = build_method("fitnet", {"hint_layer": 2, "connector": "1x1"})
    assert method.teacher_outputs == ("stages",) and build_method("fitnet", {"hint_layer": None}).teacher_outputs == (
        "prepool",)  # fmt: skip
    method.setup(student, teacher, x)
    conv = method.connector.blocks[0][0]
    assert (conv.in_channels, conv.out_channels) == (32, 32) and method.connector.target.tolist() == [16, 16]
    terms = method.losses(student.forward_features(x), teacher.forward_features(x), torch.zeros(2, dtype=torch.long), 1)
    assert torch.isfinite(terms["feature"])
    with pytest.raises(ConfigError, match=r"hint_layer=4 but the student exposes 3 stage\(s\)"):
        build_method("fitnet", {"hint_layer": 4}).setup(student, teacher, x)


def test_reviewkd_warmup_and_ofd_margins_from_the_teacher():
    student, teacher, x = build("resnet8", num_classes=10), build("resnet20", num_classes=10), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        teacher.layer2[-1].bn2.bias.fill_(10.0)  # rarely negative (Φ(−β/γ) ≤ 0.001): the margin falls back to −3·|γ|
    ofd = build_method("ofd", {})
    ofd.setup(student, teacher, x)
    assert torch.allclose(ofd.margin1.flatten(), torch.full((32,), -3.0))
    assert ofd.margin0.shape == (1, 16, 1, 1) and "margin2" in ofd.state_dict()
    rk = build_method("reviewkd", {})
    rk.setup(student, teacher, x)
    assert len(rk.abfs) == 4 and rk.abfs[0].att_conv is None and all(a.att_conv is not None for a in rk.abfs[1:])
    s_out, t_out = student.forward_features(x), teacher.eval().forward_features(x)
    y = torch.zeros(4, dtype=torch.long)
    f5, f40 = rk.losses(s_out, t_out, y, 5)["feature"], rk.losses(s_out, t_out, y, 40)["feature"]
    assert torch.allclose(f5 * 4, f40)  # min(5/20, 1) = 1/4


def test_stage_methods_refuse_a_teacher_cache(tmp_path):
    base = {"data": {"name": "synthetic", "num_samples": 40, "num_classes": 10}, "model": {"name": "resnet8"},
            "teacher": {"name": "resnet20", "checkpoint": str(_teacher(tmp_path)), "cache": str(tmp_path / "c")},
            "method": {"name": "at"}, "train": {"epochs": 1, "batch_size": 16, "progress": False, "threads": 1}}  # fmt: skip
    with pytest.raises(ConfigError, match="stages, which a teacher cache does not hold"):
        Trainer(load_config(None, [], base=base), tmp_path / "r")


@pytest.mark.parametrize("method", ["ft", "ab"])
def test_pre_phase_trains_only_the_methods_parts_then_starts_a_fresh_optimizer(tmp_path, method):
    raw = _recipe(tmp_path, method)
    raw["train"].update(epochs=1, keep_checkpoints=3)
    raw["data"]["num_samples"] = 60
    trainer = Trainer(load_config(None, [], base=raw), tmp_path / "r")
    init = {k: v.clone() for k, v in trainer.student.named_parameters()}
    stats = {k: v.clone() for k, v in trainer.student.named_buffers() if "running" in k}
    trainer.run()
    pre, main = (ck.verify_checkpoint(p) for p in reversed(ck.list_checkpoints(tmp_path / "r" / "checkpoints")))
    assert (pre.meta["epoch"], main.meta["epoch"]) == (1, 2)
    # RepDistiller's init: FT's student in eval mode (BatchNorm statistics stay), AB's backbone trains (they move)
    kept = [torch.equal(pre.tensors[f"student.{k}"], v) for k, v in stats.items()]
    assert all(kept) if method == "ft" else not any(kept)
    assert not all(torch.equal(main.tensors[f"student.{k}"], v) for k, v in stats.items())
    moved = {k for k, v in init.items() if not torch.equal(pre.tensors[f"student.{k}"], v)}
    if method == "ft":  # the student waits; the paraphraser learnt to reconstruct
        assert not moved
    else:  # AB: the backbone moved towards the teacher's boundaries, the classifier did not
        assert moved and not any(k.startswith("fc.") for k in moved) and "layer1.0.conv1.weight" in moved
    assert not any(k.startswith("optim.") for k in pre.tensors)  # cleared at the switch to the main phase
    assert any(k.startswith("optim.") for k in main.tensors)
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["lr"] == (0.01 if method == "ft" else 0.05)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["best_epoch"] == 1


# --------------------------------------------------------------------------------------------------------------------
# end to end: one distillation run through the CLI, SIGKILLed and resumed bit-identically


def _teacher(tmp: Path) -> Path:
    path = tmp / "teacher.safetensors"
    if not path.exists():
        torch.manual_seed(1)
        ck.save_weights(path, build("resnet20", num_classes=10).state_dict())
    return path


def _recipe(tmp: Path, method: str) -> dict:
    params = {"init_epochs": 1} if method in ("ft", "ab") else {}
    return {"data": {"name": "synthetic", "num_samples": 120, "num_classes": 10}, "model": {"name": "resnet8"},
            "teacher": {"name": "resnet20", "checkpoint": str(_teacher(tmp))}, "method": {"name": method, **params},
            "train": {"epochs": 2, "batch_size": 16, "progress": False, "threads": 1}, "seed": 3}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["at", "sp", "nst", "ft", "ab", "ofd", "reviewkd"])
def test_cli_distill_sigkill_then_resume_is_bit_identical(tmp_path, method):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path, method)))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kdlab", "distill", str(recipe), "--quiet", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while proc.poll() is None and not ck.list_checkpoints(out / "checkpoints") and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()  # still running: killed mid-run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["epoch_0001"]
    cfg = load_config(recipe)
    Trainer(cfg, out, resume=True).run()
    Trainer(cfg, tmp_path / "ref").run()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    pre = 1 if method in ("ft", "ab") else 0
    assert [r["epoch"] for r in rows] == list(range(1 - pre, 3))
    assert [r.get("phase") for r in rows[:pre]] == ["pre"] * pre
    if method == "ft":
        assert rows[0]["lr"] == 0.01 and "train_reconstruction" in rows[0] and "train_feature" in rows[1]
    if method == "ab":
        assert "train_ab" in rows[0] and set(k for k in rows[1] if k.startswith("train_")) == {
            "train_ce", "train_loss", "train_acc"}  # fmt: skip
