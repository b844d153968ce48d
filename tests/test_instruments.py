"""Each instrument's numbers against a direct computation (numpy / by hand) on small tensors and tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdlab.errors import KdlabError
from kdlab.instruments import (
    class_gap_heatmap,
    class_templates,
    classifier_alignment,
    feature_norm,
    histogram,
    histogram2d,
    init_logit_mean,
    logit_distance,
    logit_stats,
    pdf,
    pearson,
    project_classes,
    standardize,
    template_plane,
    theory_checks,
    tsne,
)
from kdlab.instruments.alignment import alignment_loss_correlation
from kdlab.instruments.theory import ce_logit_grad, kd_inf_grad, kd_logit_grad, lm_grad
from kdlab.models import build


def _logits(n: int = 64, k: int = 10, seed: int = 0, shift: float = 0.0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale + shift


# --------------------------------------------------------------------------------------------------------------------
# logit statistics


def test_logit_stats_match_numpy_row_by_row():
    z = _logits(17, 7, shift=1.5)
    stats = logit_stats(z)
    zn = z.double().numpy()
    for i in range(len(zn)):
        row = zn[i]
        assert stats["mean"][i].item() == pytest.approx(row.sum() / 7, abs=1e-12)
        assert stats["sum"][i].item() == pytest.approx(sum(row), abs=1e-12)
        assert stats["std"][i].item() == pytest.approx(math.sqrt(((row - row.mean()) ** 2).sum() / 7), abs=1e-12)
        assert stats["max"][i].item() == max(row)
        assert stats["range"][i].item() == pytest.approx(max(row) - min(row), abs=1e-12)


def test_logit_stats_rejects_non_matrix():
    with pytest.raises(KdlabError, match="N×K"):
        logit_stats(torch.zeros(3))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.integers(1, 300), elements=st.floats(-1e6, 1e6)), st.integers(1, 60))
@example(np.array([5e-324, 0.0]), 2)  # a spread too small for finite-sized bins
def test_histogram_counts_sum_to_sample_count(values, bins):
    h = histogram(values, bins)
    assert h.counts.sum() == len(values)
    assert len(h.edges) == bins + 1
    assert h.edges[0] <= values.min() and h.edges[-1] >= values.max()
    assert float((h.density() * np.diff(h.edges)).sum()) == pytest.approx(1.0)


def test_histogram_counts_by_hand():
    h = histogram(np.array([0.0, 0.1, 0.2, 0.9, 1.0]), bins=2)  # bins [0, .5) and [.5, 1]
    assert h.counts.tolist() == [3, 2]
    assert h.edges.tolist() == [0.0, 0.5, 1.0]


def test_histogram2d_counts_by_hand_and_total():
    x = np.array([0.0, 0.0, 1.0, 1.0, 0.2])
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.1])
    h = histogram2d(x, y, bins=2)
    assert h.counts.sum() == 5
    assert h.counts.tolist() == [[2, 1], [1, 1]]  # (x low, y low) holds (0, 0) and (0.2, 0.1)
    z = logit_stats(_logits(100))
    h2 = histogram2d(z["mean"], z["std"], bins=13)
    assert h2.counts.sum() == 100 and h2.counts.shape == (13, 13)


def test_standardize_properties():
    z = _logits(50, 10, shift=4.0, scale=5.0)
    s = standardize(z)
    assert torch.allclose(s.mean(1), torch.zeros(50, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.std(1, correction=0), torch.ones(50, dtype=torch.float64), atol=1e-12)
    assert float(s.abs().max()) <= math.sqrt(10 - 1) + 1e-9
    assert torch.equal(s.argsort(1), z.double().argsort(1))
    assert torch.allclose(standardize(z, temperature=2.0), s / 2)
    assert torch.equal(standardize(torch.ones(2, 4)), torch.zeros(2, 4, dtype=torch.float64))


def test_class_gap_heatmap_by_hand():
    k = 4
    zt, zs = _logits(30, k, seed=1), _logits(30, k, seed=2)
    y = torch.tensor([0, 1, 2] * 10)  # class 3 has no samples
    h = class_gap_heatmap(zt, zs, y, k)
    for c in range(3):
        rows = [i for i in range(30) if int(y[i]) == c]
        for j in range(k):
            expect = sum(abs(float(zt[i, j]) - float(zs[i, j])) for i in rows) / len(rows)
            assert h[c, j] == pytest.approx(expect, abs=1e-6)
    assert np.isnan(h[3]).all()
    hs = class_gap_heatmap(zt, zs, y, k, standardized=True)

    def z(v):
        v = np.asarray(v, dtype=np.float64)
        return (v - v.mean()) / v.std()

    rows0 = [i for i in range(30) if int(y[i]) == 0]
    expect0 = np.mean([np.abs(z(zt[i].numpy()) - z(zs[i].numpy())) for i in rows0], axis=0)
    np.testing.assert_allclose(hs[0], expect0, atol=1e-9)
    with pytest.raises(KdlabError):
        class_gap_heatmap(zt, zs[:, :3], y, k)


# --------------------------------------------------------------------------------------------------------------------
# distances


def test_distances_match_numpy():
    zs, zt = _logits(20, seed=3), _logits(20, seed=4)
    np.testing.assert_allclose(logit_distance(zs, zt).numpy(), np.linalg.norm(zs.numpy() - zt.numpy(), axis=1), rtol=1e-6)
    r = torch.randn(20, 3, 2, 2)
    np.testing.assert_allclose(feature_norm(r).numpy(), np.linalg.norm(r.reshape(20, -1).numpy(), axis=1), rtol=1e-6)
    h = pdf(logit_distance(zs, zt), bins=7)
    assert h.counts.sum() == 20
    assert float((h.density() * np.diff(h.edges)).sum()) == pytest.approx(1.0)
    with pytest.raises(KdlabError, match="same shape"):
        logit_distance(zs, zt[:, :5])


# --------------------------------------------------------------------------------------------------------------------
# geometry


def test_template_plane_is_orthonormal_and_contains_the_templates():
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 12, generator=g, dtype=torch.float64)
    plane = template_plane(templates)
    b = plane.basis
    assert torch.allclose(b.T @ b, torch.eye(2, dtype=torch.float64), atol=1e-12)
    back = plane.origin + plane.project(templates) @ b.T  # templates lie in the plane: projection loses nothing
    assert torch.allclose(back, templates, atol=1e-10)
    e1 = (templates[1] - templates[0]) / (templates[1] - templates[0]).norm()
    assert torch.allclose(b[:, 0], e1, atol=1e-12)
    assert torch.allclose(plane.origin, templates.mean(0))


def test_template_projection_by_hand():
    # templates e1, e2, e3 of R^3: the plane x + y + z = 1 through them, origin (1/3, 1/3, 1/3)
    feats = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0], [5.0, 5.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 3, 3])
    proj = project_classes(feats, labels, [0, 1, 2])
    assert proj.coords.shape == (3, 2) and proj.labels.tolist() == [0, 1, 2]  # class 3 is not projected
    plane = template_plane(class_templates(feats, labels, [0, 1, 2]))
    # (1,1,1) lies on the plane's normal through the origin: it projects onto the origin
    assert torch.allclose(plane.project(torch.tensor([[1.0, 1.0, 1.0]])), torch.zeros(1, 2, dtype=torch.float64))
    # e1 -> e2 is along the first basis vector: coordinates differ by |e2 - e1| = √2 along axis 0 only
    d = proj.coords[1] - proj.coords[0]
    assert d[0] == pytest.approx(math.sqrt(2)) and d[1] == pytest.approx(0, abs=1e-12)
    # equilateral triangle: every template is at distance √(2/3) from the centroid
    np.testing.assert_allclose(np.linalg.norm(proj.template_coords, axis=1), math.sqrt(2 / 3), rtol=1e-12)


def test_template_projection_errors():
    with pytest.raises(KdlabError, match="collinear"):
        template_plane(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    with pytest.raises(KdlabError, match="no samples"):
        class_templates(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), [0, 1, 2])
    with pytest.raises(KdlabError, match="3 distinct"):
        project_classes(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]), [0, 1])


def test_tsne_shape_and_determinism():
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    a, b = tsne(x, seed=1), tsne(x, seed=1)
    assert a.shape == (40, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(a, b)
    with pytest.raises(KdlabError, match="constant"):  # scikit-learn would crash the process on these
        tsne(torch.ones(20, 4))


# --------------------------------------------------------------------------------------------------------------------
# alignment


def test_alignment_mu_by_hand_on_tiny_models():
    t, s = build("mnist1d_mlp", num_classes=10), build("mnist1d_mlp", num_classes=10)
    wt, ws = t.classifier.weight.detach(), s.classifier.weight.detach()
    a = classifier_alignment(wt, ws)
    by_hand = math.sqrt(sum((float(wt[i, j]) - float(ws[i, j])) ** 2 for i in range(10) for j in range(wt.shape[1])))
    assert a.mu == pytest.approx(by_hand, rel=1e-9)
    dot = sum(float(wt[i, j]) * float(ws[i, j]) for i in range(10) for j in range(wt.shape[1]))
    assert a.cosine == pytest.approx(dot / (float(wt.norm()) * float(ws.norm())), rel=1e-6)
    assert classifier_alignment(wt, wt).mu == 0.0
    assert classifier_alignment(wt, wt).cosine == pytest.approx(1.0)


def test_alignment_needs_equal_shapes():
    t, s = build("mnist1d_cnn", num_classes=10), build("mnist1d_mlp", num_classes=10)
    with pytest.raises(KdlabError, match=r"equal classifier shapes.*\[10, 128\].*\[10, 100\]"):
        classifier_alignment(t.classifier.weight, s.classifier.weight)


def test_pearson_matches_numpy_and_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 5, 40):
        x = rng.normal(size=n)
        y = 0.5 * x + rng.normal(size=n)
        c = pearson(x, y)
        ref = stats.pearsonr(x, y)
        assert c.r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
        assert c.r == pytest.approx(ref[0], abs=1e-12)
        assert c.p == pytest.approx(ref[1], rel=1e-6)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]).r == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]).r)
    with pytest.raises(KdlabError):
        pearson([1, 2], [1, 2])


def test_alignment_loss_correlation_uses_epochs_after_skip():
    rows = [{"epoch": e, "align_mu": float(m), "train_loss": float(l)}
            for e, m, l in [(1, 5, 1), (2, 4, 9), (3, 3, 3), (4, 2, 2), (5, 1, 1)]]  # fmt: skip
    all_r = alignment_loss_correlation(rows)
    assert all_r is not None and all_r.r == pytest.approx(np.corrcoef([5, 4, 3, 2, 1], [1, 9, 3, 2, 1])[0, 1])
    late = alignment_loss_correlation(rows, skip_epochs=2)
    assert late is not None and late.n == 3 and late.r == pytest.approx(1.0)
    assert alignment_loss_correlation(rows, skip_epochs=3) is None


# --------------------------------------------------------------------------------------------------------------------
# logit mean at initialisation


def test_init_logit_mean_by_hand_and_rng_untouched():
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    before = torch.get_rng_state()
    res = init_logit_mean("mnist1d_mlp", 10, x, seeds=[0, 1, 2])
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)
    m = build("mnist1d_mlp", num_classes=10).eval()
    with torch.no_grad():
        expect = float(m(x).double().mean())
    assert res.per_seed[1] == pytest.approx(expect, abs=1e-7)
    assert res.mean == pytest.approx(np.mean(res.per_seed))
    assert res.std == pytest.approx(np.std(res.per_seed, ddof=1))
    assert res.sem == pytest.approx(res.std / math.sqrt(3))
    with pytest.raises(KdlabError):
        init_logit_mean("mnist1d_mlp", 10, x, seeds=[0], mode="bogus")


# --------------------------------------------------------------------------------------------------------------------
# theory checks


def test_kd_gradient_matches_closed_form():
    zs, zt = _logits(8, 5, seed=5), _logits(8, 5, seed=6)
    for t in (0.5, 1.0, 4.0):
        g = kd_logit_grad(zs, zt, t)
        closed = t * (torch.softmax(zs.double() / t, 1) - torch.softmax(zt.double() / t, 1))  # T(p^s − p^t)
        assert torch.allclose(g, closed, atol=1e-12)
    y = torch.arange(8) % 5
    g_ce = ce_logit_grad(zs, y)
    assert torch.allclose(g_ce, torch.softmax(zs.double(), 1) - torch.nn.functional.one_hot(y, 5).double())


def test_theory_checks_on_logits_with_a_mean_gap():
    k = 10
    zt = _logits(200, k, seed=7)
    zs = zt + 0.8 * _logits(200, k, seed=8) + 2.0  # student logits shifted: a mean gap of about 2
    th = theory_checks(zs, zt, torch.arange(200) % k)
    assert th["zero_mean_gradient"]["holds"] and th["zero_mean_gradient"]["kd_worst"] < 1e-10
    assert th["zero_mean_gradient"]["ce_max_abs_row_sum_rel"] < 1e-12
    assert th["tau_infinity"]["loglog_slope_T_ge_16"] == pytest.approx(-1.0, abs=0.05)
    assert th["tau_infinity"]["rel_error"][-1] < 1e-3
    err0 = th["tau_zero"]["mean_abs_error"]
    assert err0[0] < 1e-3 and err0[0] < err0[th["temperatures"].index(1.0)] / 100  # (near-ties converge last)
    eq = th["equal_mean"]
    assert eq["student_logit_mean"] - eq["teacher_logit_mean"] == pytest.approx(2.0, abs=0.2)
    # the KD(T→∞) vs logit-matching difference is the mean gap (Eq. 7/8) and vanishes with equal means
    assert eq["kd_vs_lm_rel_diff"] > 0.3
    assert eq["kd_vs_lm_rel_diff"] == pytest.approx(eq["predicted_by_mean_gap"], rel=1e-3)
    assert eq["kd_vs_lm_rel_diff_equal_mean"] < 1e-3
    assert torch.allclose(kd_inf_grad(zs, zt), lm_grad(zs, zt) - (zs - zt).double().mean(1, keepdim=True) / k)
