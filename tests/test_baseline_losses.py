"""The baseline losses of issue 12 (rkd, pkt, wsld, vid, catkd, crd_nce) against float64 references written from the
released conventions (explicit loops over samples, pairs and triples), in value and gradient."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab import losses as L


def _smooth_l1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5)


def _ref_rkd(s: torch.Tensor, t: torch.Tensor, wd: float, wa: float) -> torch.Tensor:
    b = len(s)
    s, t = s.reshape(b, -1), t.reshape(b, -1)

    def dist(e):
        rows = []
        for i in range(b):
            row = []
            for j in range(b):
                row.append(torch.zeros((), dtype=e.dtype) if i == j else
                           torch.sqrt(torch.clamp(((e[i] - e[j]) ** 2).sum(), min=1e-12)))  # fmt: skip
            rows.append(torch.stack(row))
        d = torch.stack(rows)
        off = [d[i, j] for i in range(b) for j in range(b) if i != j]
        return d / (sum(off) / len(off))

    def unit(v):
        n = torch.sqrt((v * v).sum())
        return v / n if float(n.detach()) > 0 else v * 0

    def angles(e):
        return torch.stack([(unit(e[j] - e[i]) * unit(e[k] - e[i])).sum()
                            for i in range(b) for j in range(b) for k in range(b)])  # fmt: skip

    dist_term = _smooth_l1(dist(s) - dist(t)).sum() / b**2
    angle_term = _smooth_l1(angles(s) - angles(t)).sum() / b**3
    return wd * dist_term + wa * angle_term


def _ref_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    b = len(s)

    def probs(e):
        e = torch.stack([e[i] / (torch.sqrt((e[i] ** 2).sum()) + eps) for i in range(b)])
        sim = [[((e[i] * e[j]).sum() + 1) / 2 for j in range(b)] for i in range(b)]
        return [[sim[i][j] / sum(sim[i]) for j in range(b)] for i in range(b)]

    ps, pt = probs(s.reshape(b, -1)), probs(t.reshape(b, -1))
    terms = [pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)]
    return sum(terms) / b**2


def _ref_wsld(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float) -> torch.Tensor:
    total = 0
    for b in range(len(s)):
        p_t = torch.exp(t[b] / temp) / torch.exp(t[b] / temp).sum()
        log_q = s[b] / temp - torch.log(torch.exp(s[b] / temp).sum())
        ce = -(p_t * log_q).sum()
        ce_s = float((torch.log(torch.exp(s[b]).sum()) - s[b, y[b]]).detach())  # the weight carries no gradient
        ce_t = float(torch.log(torch.exp(t[b]).sum()) - t[b, y[b]])
        w = 1 - math.exp(-max(ce_s / (ce_t + 1e-7), 0.0))
        total = total + w * ce
    return temp**2 * total / len(s)


def _pair(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 2
    return s, t


def _value_and_grad(fn, s, *args):
    s1 = s.detach().clone().requires_grad_(True)
    v = fn(s1, *args)
    (g,) = torch.autograd.grad(v, s1)
    return v.detach(), g


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 2, 2)])
@pytest.mark.parametrize("weights", [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)])
def test_rkd_matches_reference(shape, weights):
    s, t = _pair(*shape)
    v, g = _value_and_grad(lambda x: L.rkd(x, t, *weights), s)
    rv, rg = _value_and_grad(lambda x: _ref_rkd(x, t, *weights), s)
    assert torch.allclose(v, rv, rtol=1e-10, atol=1e-12) and torch.allclose(g, rg, rtol=1e-8, atol=1e-11)
    tt = t.clone().requires_grad_(True)
    L.rkd(s, tt).backward()
    assert tt.grad is None  # the teacher side carries no gradient


def test_rkd_coincident_points_give_zero_angle_vectors():
    s, t = _pair(4, 3)
    s = torch.cat([s[:3], s[:1]]).detach()  # rows 0 and 3 coincide: e_3 − e_0 = 0
    assert torch.allclose(L.rkd(s, t), _ref_rkd(s, t, 25.0, 50.0), rtol=1e-10)


@pytest.mark.parametrize("shape", [(6, 5), (3, 2, 4)])
def test_pkt_matches_reference(shape):
    s, t = _pair(*shape, seed=1)
    v, g = _value_and_grad(lambda x: L.pkt(x, t), s)
    rv, rg = _value_and_grad(lambda x: _ref_pkt(x, t), s)
    assert torch.allclose(v, rv, rtol=1e-10, atol=1e-14) and torch.allclose(g, rg, rtol=1e-8, atol=1e-14)
    assert float(L.pkt(t, t)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_wsld_matches_reference(temperature):
    s, t = _pair(6, 5, seed=2)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    v, g = _value_and_grad(lambda x: L.wsld(x, t, y, temperature), s)
    rv, rg = _value_and_grad(lambda x: _ref_wsld(x, t, y, temperature), s)
    assert torch.allclose(v, rv, rtol=1e-10) and torch.allclose(g, rg, rtol=1e-8, atol=1e-14)


def test_wsld_weight_carries_no_gradient_and_is_zero_when_student_is_right_with_certainty():
    t = torch.tensor([[0.0, 5.0]], dtype=torch.float64)
    s = torch.tensor([[-1e3, 1e3]], dtype=torch.float64, requires_grad=True)
    assert float(L.wsld(s, t, torch.tensor([1])).detach()) == pytest.approx(0.0, abs=1e-12)  # ce_s = 0 → w = 0


def test_vid_matches_reference():
    s, t = _pair(2, 3, 2, 2, seed=3)
    log_scale = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    var = L.vid_variance(log_scale)
    expected_var = torch.log(1 + torch.exp(log_scale.detach())) + 1e-5
    assert torch.allclose(var.detach(), expected_var)
    v = L.vid(s, t, var)
    ref = sum(0.5 * ((s[n, c, i, j] - t[n, c, i, j]) ** 2 / var[c] + torch.log(var[c]))
              for n in range(2) for c in range(3) for i in range(2) for j in range(2)) / 24  # fmt: skip
    assert torch.allclose(v, ref, rtol=1e-12)
    g1 = torch.autograd.grad(v, log_scale, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, log_scale)[0]
    assert torch.allclose(g1, g2, rtol=1e-10)


def test_catkd_matches_reference():
    g = torch.Generator().manual_seed(4)
    fs = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ft = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    ws = torch.randn(6, 3, generator=g, dtype=torch.float64)
    wt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    cs, ct = L.class_activation_maps(fs, ws), L.class_activation_maps(ft, wt)
    assert cs.shape == (2, 6, 4, 4)
    assert torch.allclose(cs.mean(dim=(2, 3)), fs.mean(dim=(2, 3)) @ ws.T)  # pooled CAMs = logits less the bias

    def pooled(c):  # 4×4 → 2×2 block means
        return c.reshape(2, 6, 2, 2, 2, 2).mean(dim=(3, 5))

    for normalize in (False, True):
        a, b = pooled(cs), pooled(ct)
        if normalize:
            a = a / a.flatten(2).norm(dim=2)[..., None, None]
            b = b / b.flatten(2).norm(dim=2)[..., None, None]
        assert torch.allclose(L.catkd(cs, ct, 2, normalize), ((a - b) ** 2).mean(), rtol=1e-12)


def test_crd_nce_matches_reference():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 5, generator=g, dtype=torch.float64) * 1e-3
    n, m = 1000, 4
    pn = 1 / n
    pos = [math.log(x[b, 0] / (x[b, 0] + m * pn + 1e-7)) for b in range(3)]
    neg = [math.log(m * pn / (x[b, k] + m * pn + 1e-7)) for b in range(3) for k in range(1, 5)]
    ref = -(sum(pos) + sum(neg)) / 3
    assert float(L.crd_nce(x, n)) == pytest.approx(ref, rel=1e-12)


def test_feature_losses_are_exported():
    from kdlab.losses import feature

    for name in ("fitnet", "simkd", "srrl", "ijckd", "rkd", "pkt", "wsld"):
        assert name in L.__all__ and callable(getattr(L, name))
    assert L.fitnet is feature.fitnet
