"""Logit losses against direct computations, the released reference code and the papers' equations.

Papers in /work/shared/papers: kl-vs-mse-in-kd.md (KvM), kd-vs-logit-matching-equivalence.md (KvLM),
logit-standardization-in-kd.md (LS).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from _logit_reference import (
    release_bc_loss,
    release_cc_loss,
    release_dkd,
    release_kd_loss,
    release_mlkd,
    release_normalize,
)

from kdlab import losses as L

B, K = 6, 7
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def logits(seed: int, b: int = B, k: int = K, scale: float = 3.0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, generator=g, dtype=F64) * scale + torch.randn(b, 1, generator=g, dtype=F64)).to(dtype)


def labels(seed: int, b: int = B, k: int = K) -> torch.Tensor:
    return torch.randint(0, k, (b,), generator=torch.Generator().manual_seed(seed))


def grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z), z)
    return g


# ---------------------------------------------------------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_equals_direct_formula_for_every_scale(temperature):
    s, t = logits(0), logits(1)
    ps, pt = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    kl = (pt * (pt.log() - ps.log())).sum(1).mean()
    factors = [("tau2", temperature**2), ("max", max(temperature, temperature**2)), ("none", 1.0), (2.5, 2.5)]
    for scale, factor in factors:
        assert L.kd(s, t, temperature, scale=scale).item() == pytest.approx(factor * kl.item(), rel=1e-12)


def test_kd_matches_released_kd_loss_with_and_without_logit_stand():
    s, t = logits(2), logits(3)
    assert torch.allclose(L.kd(s, t, 4.0), release_kd_loss(s, t, 4.0), rtol=1e-12)
    zs = L.kd(s, t, 2.0, standardize="zscore")
    assert torch.allclose(zs, release_kd_loss(s, t, 2.0, logit_stand=True), rtol=1e-12)
    assert torch.allclose(L.kd(s, t, 3.0, reduction="none"), release_kd_loss(s, t, 3.0, reduce=False), rtol=1e-12)


def test_kd_with_one_temperature_per_sample_scales_each_sample_by_its_own_t2():
    s, t = logits(4), logits(5)
    temps = torch.linspace(0.5, 8.0, B, dtype=F64)
    rows = [L.kd(s[i : i + 1], t[i : i + 1], float(temps[i])) for i in range(B)]
    assert torch.allclose(L.kd(s, t, temps), torch.stack(rows).mean(), rtol=1e-12)
    assert torch.allclose(L.kd(s, t, temps[:, None]), torch.stack(rows).mean(), rtol=1e-12)
    with pytest.raises(ValueError, match="temperature has 3 values"):
        L.kd(s, t, torch.ones(3))


def test_kd_of_identical_logits_is_zero_and_kd_is_nonnegative():
    s, t = logits(6), logits(7)
    assert L.kd(s, s, 4.0).item() == pytest.approx(0.0, abs=1e-14)
    assert L.kd(s, t, 4.0).item() > 0


@pytest.mark.parametrize("temperature", [0.7, 4.0, 20.0])
def test_kd_gradient_is_T_times_prob_difference_and_sums_to_zero(temperature):
    """KvLM Eq. 5 / A.3 and KvM Eq. 3: ∂(T²·KL)/∂z^s = T(p^s − p^t), whose components sum to zero."""
    s, t = logits(8), logits(9)
    g = grad(lambda z: L.kd(z, t, temperature), s) * B  # undo the batch mean
    expected = temperature * (F.softmax(s / temperature, 1) - F.softmax(t / temperature, 1))
    assert torch.allclose(g, expected, atol=1e-12)
    assert g.sum(1).abs().max().item() < 1e-12


def test_cross_entropy_gradient_is_p_minus_y_and_sums_to_zero():
    """KvLM Eq. 6 / B.3."""
    s, y = logits(10), labels(10)
    g = grad(lambda z: L.cross_entropy(z, y), s) * B
    assert torch.allclose(g, F.softmax(s, 1) - F.one_hot(y, K).to(F64), atol=1e-12)
    assert g.sum(1).abs().max().item() < 1e-12


# ------------------------------------------------------------------------------------------------------- limits


def kd_inf_direct(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    d = s - t
    return ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * s.shape[1])


def test_kd_inf_value_and_its_decomposition_into_mse_plus_delta_inf():
    """KvM Eq. 8: lim T²·KL = (1/2K)‖z^s − z^t‖² + δ_∞, δ_∞ = −(1/2K²)(Σz^s − Σz^t)²."""
    s, t = logits(11), logits(12)
    d = s - t
    delta_inf = -(d.sum(1) ** 2) / (2 * K**2)
    assert torch.allclose(L.kd_inf(s, t), kd_inf_direct(s, t), rtol=1e-12)
    assert torch.allclose(L.kd_inf(s, t), (L.mse(s, t, "sum") / (2 * K) + delta_inf.mean()), rtol=1e-12)
    assert torch.allclose(L.kd_inf(s, t), L.lm(s, t) + delta_inf.mean(), rtol=1e-12)


def test_kd_inf_gradient_is_eq5_of_kl_vs_mse():
    """KvM Eq. 5: (1/K)(z^s_k − z^t_k) − (1/K²) Σ_j (z^s_j − z^t_j); zero-mean across classes."""
    s, t = logits(13), logits(14)
    g = grad(lambda z: L.kd_inf(z, t), s) * B
    d = s - t
    assert torch.allclose(g, d / K - d.sum(1, keepdim=True) / K**2, atol=1e-12)
    assert g.sum(1).abs().max().item() < 1e-12


def test_t2_kd_gradient_tends_to_kd_inf_gradient_with_error_like_one_over_T():
    """KvM Proposition 1 (Eq. 5), T → ∞: the error of T·(p^s − p^t) against Eq. 5 is O(1/T)."""
    s, t = logits(15), logits(16)
    g_inf = grad(lambda z: L.kd_inf(z, t), s)
    temps = [25.0, 50.0, 100.0, 200.0, 400.0, 800.0]
    errs = [(grad(lambda z: L.kd(z, t, T), s) - g_inf).abs().max().item() for T in temps]
    assert errs[-1] < 5e-3 * g_inf.abs().max().item()
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert all(1.8 < r < 2.2 for r in ratios), ratios  # halving with every doubling of T: error ∝ 1/T
    vals = [abs(L.kd(s, t, T).item() - L.kd_inf(s, t).item()) for T in temps]
    assert vals[-1] < 5e-3 * L.kd_inf(s, t).item() and all(a > b for a, b in zip(vals, vals[1:]))


def test_grad_over_tau_tends_to_indicator_difference_as_tau_goes_to_zero():
    """KvM Eq. 6: (1/τ)·∂L_KL/∂z^s_k → 1[argmax z^s = k] − 1[argmax z^t = k] as τ → 0."""
    s, t = logits(17), logits(18)
    assert (s.argmax(1) != t.argmax(1)).any()
    ind = F.one_hot(s.argmax(1), K).to(F64) - F.one_hot(t.argmax(1), K).to(F64)
    errs = [(grad(lambda z: L.kd(z, t, tau), s) * B / tau - ind).abs().max().item() for tau in (1e-1, 1e-2, 1e-3)]
    assert errs[0] > 0.1 and all(a > b for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-6
    # Eq. 7's max(τ, τ²) scaling keeps the gradient at the indicator difference without the 1/τ correction.
    g = grad(lambda z: L.kd(z, t, 1e-3, scale="max"), s) * B
    assert (g - ind).abs().max().item() < 1e-6


def test_t2_kd_tends_to_lm_exactly_when_logit_means_are_equal():
    """KvLM Sec. 3: infinite temperature + equal-mean logits ⇒ KD ≡ LM (loss and gradient)."""
    t = logits(19)
    s = logits(20)
    s_eq = s - s.mean(1, keepdim=True) + t.mean(1, keepdim=True)
    big = 2000.0
    assert L.kd(s_eq, t, big).item() == pytest.approx(L.lm(s_eq, t).item(), rel=2e-3)
    g_kd, g_lm = grad(lambda z: L.kd(z, t, big), s_eq), grad(lambda z: L.lm(z, t), s_eq)
    assert (g_kd - g_lm).abs().max().item() < 2e-3 * g_lm.abs().max().item()
    # With unequal means the limit is LM plus δ_∞ (it is not LM): the gap is mean(d̄²)/2.
    gap = L.lm(s, t).item() - L.kd(s, t, big).item()
    assert gap == pytest.approx(0.5 * ((s - t).mean(1) ** 2).mean().item(), rel=5e-3)
    assert gap > 0.1


def test_lm_value_and_gradient():
    """KvLM Eq. 2: L_LM = (1/2K)‖z^t − z^s‖², ∂L_LM/∂z^s = (z^s − z^t)/K."""
    s, t = logits(21), logits(22)
    assert L.lm(s, t).item() == pytest.approx(((t - s) ** 2).sum(1).mean().item() / (2 * K), rel=1e-12)
    assert torch.allclose(grad(lambda z: L.lm(z, t), s) * B, (s - t) / K, atol=1e-12)


def test_lm_offset_is_the_t_infinity_kd_gradient_and_flags_the_papers_sign():
    """KvLM Eq. 7/8 with c = the logit means. The correct sign reproduces lim T²·KD (= kd_inf, KvM Eq. 5); the
    printed sign (as_printed=True) gives (1/K)(z^s − z^t + c^s − c^t), which differs whenever c^s ≠ c^t."""
    s, t = logits(23), logits(24)
    cs, ct = s.mean(1), t.mean(1)
    g_inf = grad(lambda z: L.kd_inf(z, t), s)
    g_off = grad(lambda z: L.lm_offset(z, t, cs, ct), s)
    assert torch.allclose(g_off, g_inf, atol=1e-12)
    g_printed = grad(lambda z: L.lm_offset(z, t, cs, ct, as_printed=True), s) * B
    assert torch.allclose(g_printed, (s - t + (cs - ct)[:, None]) / K, atol=1e-12)
    assert (g_printed - g_inf * B).abs().max().item() > 0.1
    # value: LM minus ((c^s − c^t)/K)·Σz^s; a scalar c works too
    value = ((t - s) ** 2).sum(1) / (2 * K) - (cs - ct) / K * s.sum(1)
    assert L.lm_offset(s, t, cs, ct).item() == pytest.approx(value.mean().item(), rel=1e-12)
    assert L.lm_offset(s, t, 0.5, 0.5).item() == pytest.approx(L.lm(s, t).item(), rel=1e-12)


def test_mse_reductions():
    """KvM Eq. 9: "mean" is nn.MSELoss (released code), "sum" is ‖z^s − z^t‖² per sample, batch mean."""
    s, t = logits(25), logits(26)
    assert torch.allclose(L.mse(s, t), F.mse_loss(s, t), rtol=1e-12)
    assert torch.allclose(L.mse(s, t, "sum"), ((s - t) ** 2).sum(1).mean(), rtol=1e-12)
    assert torch.allclose(L.mse(s, t, "sum"), K * L.mse(s, t), rtol=1e-12)
    with pytest.raises(ValueError):
        L.mse(s, t, "median")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- standardization


def test_zscore_defaults_equal_the_released_normalize():
    z = logits(27, dtype=torch.float32)
    assert torch.allclose(L.zscore(z), release_normalize(z), atol=1e-6)
    assert torch.allclose(L.zscore(z, temperature=2.0), release_normalize(z) / 2.0, atol=1e-6)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_zscore_algorithm1_zero_mean_std_one_over_tau_bounded_and_order_preserving(tau):
    """LS Sec. 4.3: zero mean, standard deviation 1/τ, |Z| ≤ √(K−1)/τ, monotonic (ddof=0, eps=0: Algorithm 1)."""
    z = logits(28)
    out = L.zscore(z, tau, ddof=0, eps=0.0)
    assert out.mean(1).abs().max().item() < 1e-12
    assert torch.allclose(out.std(1, correction=0), torch.full((B,), 1 / tau, dtype=F64), atol=1e-12)
    assert out.abs().max().item() <= math.sqrt(K - 1) / tau + 1e-12
    assert torch.equal(out.argsort(1), z.argsort(1))
    spike = F.one_hot(torch.tensor([3]), K).to(F64) * 5.0  # the bound is attained by a one-hot row
    assert L.zscore(spike, tau, ddof=0, eps=0.0).max().item() == pytest.approx(math.sqrt(K - 1) / tau, rel=1e-12)
    # ddof=1 (the release) divides by the sample std instead: std of the output is sqrt((K−1)/K)/τ (ddof=0)
    out1 = L.zscore(z, tau, ddof=1, eps=0.0)
    assert torch.allclose(out1.std(1, correction=1), torch.full((B,), 1 / tau, dtype=F64), atol=1e-12)


def test_standardize_modes_are_the_table4_columns():
    z = logits(29)
    zbar, sd = z.mean(1, keepdim=True), z.std(1, keepdim=True)
    assert torch.equal(L.standardize(z, None), z)
    assert torch.allclose(L.standardize(z, "center"), z - zbar, atol=1e-12)
    assert torch.allclose(L.standardize(z, "scale", eps=0.0), z / sd, atol=1e-12)
    assert torch.allclose(L.standardize(z, "zscore", eps=0.0), (z - zbar) / sd, atol=1e-12)
    assert torch.allclose(L.standardize(z, "zscore", ddof=0, eps=0.0), (z - zbar) / z.std(1, correction=0)[:, None])
    assert torch.equal(L.standardize(z, lambda x: 2 * x), 2 * z)
    with pytest.raises(ValueError, match="unknown standardize mode"):
        L.standardize(z, "minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="undefined"):
        L.logit_std(torch.zeros(2, 1), ddof=1)


ALG1 = functools.partial(L.zscore, ddof=0, eps=0.0)


@pytest.mark.parametrize("loss", ["kd", "kd_inf", "lm", "mse", "dkd"])
def test_zscore_losses_are_invariant_to_shift_and_positive_scale_of_the_student(loss):
    """LS Sec. 4.2–4.3: after Z-score only the relations between logits matter, not their range or offset."""
    s, t, y = logits(30), logits(31), labels(30)
    fns = {
        "kd": lambda a: L.kd(a, t, 2.0, standardize=ALG1),
        "kd_inf": lambda a: L.kd_inf(a, t, standardize=ALG1),
        "lm": lambda a: L.lm(a, t, standardize=ALG1),
        "mse": lambda a: L.mse(a, t, standardize=ALG1),
        "dkd": lambda a: L.dkd(a, t, y, temperature=2.0, standardize=ALG1),
    }
    fn = fns[loss]
    ref = fn(s).item()
    for a, b in [(3.0, 0.0), (0.2, -7.0), (1.0, 11.0)]:
        assert fn(a * s + b).item() == pytest.approx(ref, rel=1e-10)
    assert abs(fn(s.flip(1)).item() - ref) > 1e-3  # not invariant to everything
    # with the release's defaults (ddof=1, eps=1e-7) the invariance holds up to the epsilon
    assert L.kd(5 * s + 3, t, 2.0, standardize="zscore").item() == pytest.approx(
        L.kd(s, t, 2.0, standardize="zscore").item(), rel=1e-5
    )


def test_center_and_scale_variants():
    """Table 4 of LS. Softmax is invariant to a per-row shift, so for KD "z − z̄" is *the same objective* as plain KD
    (the table's two columns differ only by run-to-run noise); "z/σ" makes KD scale invariant. For the squared-error
    losses the variants differ: center removes only the shift, scale only the range."""
    s, t = logits(32), logits(33)
    sc0 = functools.partial(L.scale, eps=0.0)
    assert L.kd(s, t, 2.0, standardize="center").item() == pytest.approx(L.kd(s, t, 2.0).item(), rel=1e-12)
    kd_sc = lambda a: L.kd(a, t, 2.0, standardize=sc0).item()  # noqa: E731
    assert kd_sc(3 * s + 4) == pytest.approx(kd_sc(s), rel=1e-12)
    assert abs(L.kd(3 * s, t, 2.0).item() - L.kd(s, t, 2.0).item()) > 1e-3
    lm_c = lambda a: L.lm(a, t, standardize="center").item()  # noqa: E731
    lm_s = lambda a: L.lm(a, t, standardize=sc0).item()  # noqa: E731
    assert lm_c(s + 4) == pytest.approx(lm_c(s), rel=1e-12) and abs(lm_c(3 * s) - lm_c(s)) > 1e-3
    assert lm_s(3 * s) == pytest.approx(lm_s(s), rel=1e-12) and abs(lm_s(s + 4) - lm_s(s)) > 1e-3


def test_gradients_flow_through_the_students_mean_and_std():
    """Shift and scale invariance imply a loss gradient orthogonal to 1 and to z per row; that holds only if the
    gradient passes through z̄ and σ(z) (with them detached, it does not)."""
    s, t = logits(34), logits(35)
    g = grad(lambda z: L.kd(z, t, 2.0, standardize=ALG1), s)
    assert g.sum(1).abs().max().item() < 1e-12
    assert (g * s).sum(1).abs().max().item() < 1e-12

    def detached(z):
        return (z - z.mean(1, keepdim=True).detach()) / z.std(1, correction=0, keepdim=True).detach()

    g_det = grad(lambda z: L.kd(z, t, 2.0, standardize=detached), s)
    assert (g_det * s).sum(1).abs().max().item() > 1e-3


def test_toy_case_of_fig2_plain_kd_prefers_the_wrong_student_zscore_the_right_one():
    """LS Fig. 2: S1 is close to the teacher in magnitude but predicts the wrong class; S2 keeps the teacher's logit
    relations at a smaller scale and predicts correctly. Plain KD ranks S1 better, Z-score KD ranks S2 better."""
    teacher = torch.tensor([[1.0, 5.0, 4.0]])  # cat, dog, bird: "dog"
    s1 = torch.tensor([[1.0, 4.4, 4.6]])  # "bird"
    s2 = teacher / 10  # "dog"
    assert s1.argmax().item() != teacher.argmax().item() == s2.argmax().item()
    plain1, plain2 = L.kd(s1, teacher, 1.0).item(), L.kd(s2, teacher, 1.0).item()
    z1, z2 = L.kd(s1, teacher, 1.0, standardize="zscore").item(), L.kd(s2, teacher, 1.0, standardize="zscore").item()
    assert plain1 < plain2
    assert z2 < z1 and z2 < 1e-6


# --------------------------------------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_dkd_equals_the_released_formula_on_moderate_logits(dtype):
    s, t, y = logits(36, dtype=dtype), logits(37, dtype=dtype), labels(36)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert torch.allclose(L.dkd(s, t, y), release_dkd(s, t, y, 1.0, 8.0, 4.0), rtol=tol)
    assert torch.allclose(
        L.dkd(s, t, y, 9.0, 72.0, 2.0, standardize="zscore"), release_dkd(s, t, y, 9.0, 72.0, 2.0, True), rtol=tol
    )
    gs = grad(lambda z: L.dkd(z, t, y), s)
    gr = grad(lambda z: release_dkd(z, t, y, 1.0, 8.0, 4.0), s)
    assert torch.allclose(gs, gr, atol=tol)


def test_dkd_is_alpha_tckd_plus_beta_nckd_and_decomposes_kd():
    """DKD's decomposition: KL(p^t‖p^s) = TCKD + (1 − p^t_target)·NCKD per sample (exact non-target removal)."""
    s, t, y = logits(38), logits(39), labels(38)
    T = 3.0
    assert torch.allclose(
        L.dkd(s, t, y, 2.0, 5.0, T), 2.0 * L.tckd(s, t, y, T) + 5.0 * L.nckd(s, t, y, T), rtol=1e-12
    )
    for i in range(B):
        si, ti, yi = s[i : i + 1], t[i : i + 1], y[i : i + 1]
        pt_target = F.softmax(ti / T, 1)[0, yi].item()
        rhs = L.tckd(si, ti, yi, T) + (1 - pt_target) * L.nckd(si, ti, yi, T, gt_offset=None)
        assert L.kd(si, ti, T).item() == pytest.approx(rhs.item(), rel=1e-10)
    # the release's 1000-offset agrees with exact removal on moderate logits
    assert L.nckd(s, t, y, T).item() == pytest.approx(L.nckd(s, t, y, T, gt_offset=None).item(), rel=1e-9)


def test_dkd_is_finite_in_float32_for_logits_of_magnitude_1e3():
    s, t, y = logits(40, scale=1e3, dtype=torch.float32), logits(41, scale=1e3, dtype=torch.float32), labels(40)
    with torch.no_grad():
        release = release_dkd(s, t, y, 1.0, 8.0, 4.0)
    ours = L.dkd(s, t, y)
    assert torch.isfinite(ours) and ours.item() > 0
    assert torch.isfinite(grad(lambda z: L.dkd(z, t, y), s)).all()
    # float64 evaluation of the same numbers agrees (log space loses nothing to underflow)
    assert ours.item() == pytest.approx(L.dkd(s.double(), t.double(), y).item(), rel=1e-4)
    assert not torch.isfinite(release) or release.item() == pytest.approx(ours.item(), rel=1e-3)


# ------------------------------------------------------------------------------------------------------- CTKD


def test_ctkd_lambda_is_the_released_cosine_curriculum():
    def release_cosine_decay(i, max_value=0.0, min_value=-1.0, num_loops=10):
        i = min(max(i, 0), num_loops)
        return (math.cos(i * math.pi / num_loops) + 1.0) * 0.5 * (max_value - min_value) + min_value

    values = [L.ctkd_lambda(e) for e in range(0, 15)]
    assert values == pytest.approx([release_cosine_decay(e) for e in range(0, 15)], abs=1e-15)
    assert values[0] == 0.0 and values[5] == pytest.approx(-0.5) and values[10:] == [-1.0] * 5
    assert all(a > b for a, b in zip(values[:11], values[1:11]))
    assert L.ctkd_lambda(3, decay_epochs=0) == -1.0


def test_ctkd_temperature_range():
    theta = torch.tensor([-50.0, -1.0, 0.0, 1.0, 50.0], dtype=F64)
    temp = L.ctkd_temperature(theta)
    assert temp[0].item() == pytest.approx(1.0) and temp[-1].item() == pytest.approx(21.0)
    assert temp[3].item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert torch.all(temp[1:] > temp[:-1])


@pytest.mark.parametrize("lam", [0.0, -0.3, -1.0])
def test_gradient_reversal_is_identity_forward_and_scales_the_gradient_by_lambda(lam):
    s, t = logits(42), logits(43)
    theta = torch.tensor([1.0], dtype=F64, requires_grad=True)
    loss = L.kd(s, t, L.ctkd_temperature(L.gradient_reversal(theta, lam)))
    assert loss.item() == pytest.approx(L.kd(s, t, L.ctkd_temperature(theta)).item(), rel=1e-15)
    (g_rev,) = torch.autograd.grad(loss, theta)
    (g,) = torch.autograd.grad(L.kd(s, t, L.ctkd_temperature(theta)), theta)
    assert g.abs().item() > 1e-4
    assert g_rev.item() == pytest.approx(lam * g.item(), abs=1e-15)  # λ < 0: θ ascends the KD loss


# ------------------------------------------------------------------------------------------------------- MLKD


def test_mlkd_masks_equal_the_released_percentile_masks():
    t = logits(44, b=9)
    p = F.softmax(t, 1)
    conf, cconf = p.max(1).values, p.sum(0)
    sample, cls = L.mlkd_masks(t)
    import numpy as np

    assert torch.equal(sample, conf.le(float(np.percentile(conf.numpy(), 50))))
    assert torch.equal(cls, cconf.le(float(np.percentile(cconf.numpy(), 50))))
    assert sample.sum().item() == 5 and cls.sum().item() == (K + 1) // 2


def test_mlkd_levels_against_direct_formulas():
    s, t = logits(45), logits(46)
    temps = (4.0, 2.0)
    inst = sum(L.kd(s, t, T) for T in temps)
    assert torch.allclose(L.mlkd_instance(s, t, temps), inst, rtol=1e-12)
    soft = {T: (F.softmax(s / T, 1), F.softmax(t / T, 1)) for T in temps}
    bc = sum(((pt @ pt.T - ps @ ps.T) ** 2).sum() / B for ps, pt in soft.values())
    cc = sum(((pt.T @ pt - ps.T @ ps) ** 2).sum() / K for ps, pt in soft.values())
    assert torch.allclose(L.mlkd_batch(s, t, temps), bc, rtol=1e-12)
    assert torch.allclose(L.mlkd_class(s, t, temps), cc, rtol=1e-12)
    for T in temps:
        assert torch.allclose(L.mlkd_batch(s, t, [T]), release_bc_loss(s, t, T), rtol=1e-12)
        assert torch.allclose(L.mlkd_class(s, t, [T]), release_cc_loss(s, t, T), rtol=1e-12)
    mask = torch.tensor([True, False, True, True, False, False])
    # release masking is the constant factor mean(mask); per-sample masking selects samples
    assert torch.allclose(L.mlkd_instance(s, t, temps, mask), inst * 0.5, rtol=1e-12)
    per = sum((L.kd(s, t, T, reduction="none") * mask).mean() for T in temps)
    assert torch.allclose(L.mlkd_instance(s, t, temps, mask, "per_sample"), per, rtol=1e-12)
    assert torch.allclose(L.mlkd_instance(s, t, temps, mask, "none"), inst, rtol=1e-12)


@pytest.mark.parametrize("mask_mode,reduce", [("release", True), ("per_sample", False)])
def test_mlkd_terms_equal_the_released_forward_train(mask_mode, reduce):
    sw, ss, tw, ts, y = logits(47), logits(48), logits(49), logits(50), labels(47)
    ours = L.mlkd_terms(sw, tw, y, ss, ts, mask_mode=mask_mode)
    ref = release_mlkd(sw, ss, tw, ts, y, reduce=reduce)
    assert ours.keys() == ref.keys()
    for k in ours:
        assert torch.allclose(ours[k], ref[k], rtol=1e-12), k
    # logit standardization recipe (T0 = 2, KD weight 9), instance terms only
    ours = L.mlkd_terms(sw, tw, y, ss, ts, temperatures=(2, 3, 5, 2, 6), kd_weight=9.0, standardize="zscore")
    ref = release_mlkd(sw, ss, tw, ts, y, T=2.0, kd_w=9.0, logit_stand=True)
    for k in ours:
        assert torch.allclose(ours[k], ref[k], rtol=1e-12), k


def test_mlkd_single_view_is_the_release_with_two_identical_views_and_quirks_can_be_switched_off():
    sw, ss, tw, ts, y = logits(51), logits(52), logits(53), logits(54), labels(51)
    single = L.mlkd_terms(sw, tw, y)
    ref = release_mlkd(sw, sw, tw, tw, y)
    for k in single:
        assert torch.allclose(single[k], ref[k], rtol=1e-12), k
    clean = L.mlkd_terms(sw, tw, y, ss, ts, release_quirks=False)
    quirky = L.mlkd_terms(sw, tw, y, ss, ts)
    masked_weak = L.mlkd_instance(sw, tw, mask=L.mlkd_masks(tw)[0])
    assert torch.allclose(clean["kd"], 0.9 * (masked_weak + L.mlkd_instance(ss, ts)), rtol=1e-12)
    assert not torch.allclose(clean["kd"], quirky["kd"])
    with pytest.raises(ValueError, match="both"):
        L.mlkd_terms(sw, tw, y, ss, None)


# ---------------------------------------------------------------------------------------- numerical robustness


def _all_losses(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temp: float, std) -> dict[str, torch.Tensor]:
    return {
        "kd": L.kd(s, t, temp, standardize=std),
        "kd_max": L.kd(s, t, temp, scale="max", standardize=std),
        "kd_inf": L.kd_inf(s, t, standardize=std),
        "lm": L.lm(s, t, standardize=std),
        "mse": L.mse(s, t, standardize=std),
        "dkd": L.dkd(s, t, y, temperature=temp, standardize=std),
        "dkd_exact": L.dkd(s, t, y, temperature=temp, standardize=std, gt_offset=None),
        "mlkd": sum(L.mlkd_terms(s, t, y, temperatures=(temp, 2.0), standardize=std).values()),
    }


@pytest.mark.parametrize("magnitude", [1.0, 1e2, 1e4])
@pytest.mark.parametrize("temp", [1e-3, 1.0, 1e4])
@pytest.mark.parametrize("std", [None, "zscore", "center", "scale", ALG1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_losses_and_gradients_are_finite_in_float32_and_bf16(magnitude, temp, std, dtype):
    y = labels(55)
    s = logits(55, scale=magnitude, dtype=torch.float32).to(dtype)
    t = logits(56, scale=magnitude, dtype=torch.float32).to(dtype)
    s[0] = 7.0  # a constant row
    t[1] = -3.0
    s = s.requires_grad_(True)
    for name, value in _all_losses(s, t, y, temp, std).items():
        assert torch.isfinite(value), (name, value)
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(g).all(), name


def test_constant_rows_standardize_to_zeros():
    z = torch.full((2, K), 3.0, requires_grad=True)
    for fn in (L.zscore, ALG1, L.scale):
        out = fn(z)
        assert torch.isfinite(out).all()
        (g,) = torch.autograd.grad(out.square().sum() + out.sum(), z)
        assert torch.isfinite(g).all()
    assert torch.equal(L.zscore(z), torch.zeros(2, K))
