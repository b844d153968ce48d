"""Property tests (hypothesis, derandomized) of the logit losses: the papers' statements on arbitrary inputs."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kdlab import losses as L

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)
ALG1 = functools.partial(L.zscore, ddof=0, eps=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


@st.composite
def logit_pairs(draw, max_mag: float = 1e3, dtype=np.float64):
    b = draw(st.integers(1, 5))
    k = draw(st.integers(2, 12))
    elems = st.floats(-max_mag, max_mag, allow_nan=False, allow_infinity=False, width=64)
    s = draw(arrays(dtype, (b, k), elements=elems))
    t = draw(arrays(dtype, (b, k), elements=elems))
    y = draw(arrays(np.int64, (b,), elements=st.integers(0, k - 1)))
    return torch.from_numpy(s), torch.from_numpy(t), torch.from_numpy(y)


def _spread(z: torch.Tensor) -> bool:
    return bool((z.std(1, correction=0) > 1e-6 * (1 + z.abs().amax(1))).all())


@SETTINGS
@given(logit_pairs(), st.floats(0.1, 10.0))
def test_zscore_zero_mean_std_bound_and_monotone(pair, tau):
    z = pair[0]
    if not _spread(z):
        return
    out = L.zscore(z, tau, ddof=0, eps=0.0)
    k = z.shape[1]
    assert out.mean(1).abs().max().item() < 1e-9 / tau
    assert torch.allclose(out.std(1, correction=0), torch.full((z.shape[0],), 1 / tau, dtype=z.dtype), rtol=1e-9)
    assert out.abs().max().item() <= math.sqrt(k - 1) / tau * (1 + 1e-9)
    # order preserving: z_i > z_j ⇒ Z_i > Z_j (for gaps above the float resolution of the row)
    di, do = z[:, :, None] - z[:, None, :], out[:, :, None] - out[:, None, :]
    resolved = di > 1e-12 * (1 + z.abs().amax(1))[:, None, None]
    assert not (resolved & (do <= 0)).any()


@SETTINGS
@given(logit_pairs(max_mag=50.0), st.floats(0.2, 20.0))
def test_kd_and_ce_gradients_sum_to_zero_and_kd_is_nonnegative(pair, temperature):
    s, t, y = pair
    z = s.clone().requires_grad_(True)
    loss = L.kd(z, t, temperature)
    assert loss.item() >= -1e-12
    (g,) = torch.autograd.grad(loss, z)
    assert g.sum(1).abs().max().item() < 1e-10 * max(1.0, temperature)
    (g,) = torch.autograd.grad(L.cross_entropy(z, y), z)
    assert g.sum(1).abs().max().item() < 1e-12
    assert abs(L.kd(s, s, temperature).item()) < 1e-10


@SETTINGS
@given(logit_pairs(max_mag=20.0), st.floats(0.05, 20.0), st.floats(-100.0, 100.0))
def test_zscore_kd_invariant_to_positive_scale_and_shift_of_student(pair, a, b):
    s, t, _ = pair
    if not _spread(s):
        return
    ref = L.kd(s, t, 2.0, standardize=ALG1).item()
    assert abs(L.kd(a * s + b, t, 2.0, standardize=ALG1).item() - ref) < 1e-7 * (1 + ref)


@SETTINGS
@given(logit_pairs(max_mag=10.0), st.floats(0.5, 8.0))
def test_dkd_terms_are_nonnegative_and_decompose_kd(pair, temperature):
    s, t, y = pair
    tc, nc = L.tckd(s, t, y, temperature), L.nckd(s, t, y, temperature, gt_offset=None)
    assert tc.item() >= -1e-12 and nc.item() >= -1e-12
    if s.shape[0] == 1:
        pt = torch.softmax(t / temperature, 1)[0, y[0]].item()
        kd = L.kd(s, t, temperature).item()
        assert abs(kd - (tc.item() + (1 - pt) * nc.item())) < 1e-9 * (1 + kd)


@SETTINGS
@given(
    logit_pairs(max_mag=1e4, dtype=np.float32),
    st.sampled_from([1e-3, 0.1, 1.0, 4.0, 1e2, 1e4]),
    st.sampled_from([None, "zscore", "scale", "center"]),
    st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_every_loss_is_finite_with_finite_gradient_in_float32_and_bf16(pair, temperature, std, dtype):
    s, t, y = pair
    t = t.to(dtype)
    z = s.clone().to(dtype).requires_grad_(True)
    values = [
        L.kd(z, t, temperature, standardize=std),
        L.kd_inf(z, t, standardize=std),
        L.lm(z, t, standardize=std),
        L.mse(z, t, standardize=std),
        L.dkd(z, t, y, temperature=temperature, standardize=std),
        sum(L.mlkd_terms(z, t, y, temperatures=(temperature,), standardize=std).values()),
    ]
    for v in values:
        assert torch.isfinite(v)
        (g,) = torch.autograd.grad(v, z)
        assert torch.isfinite(g).all()
