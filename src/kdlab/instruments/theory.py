"""The papers' theory, measured on a user's own teacher and student logits.

Gradients are taken by autograd through kdlab's own losses (``kdlab.losses.kd`` = T²·KL, ``cross_entropy``) in
float64, per sample (the batch-mean gradient times N). With ``d = z^s − z^t`` and K classes:

* zero-mean gradient (kd-vs-logit-matching Eq. 5, 6): ``Σ_k ∂(T²·KD)/∂z^s_k = 0`` and ``Σ_k ∂CE/∂z_k = 0``.
* τ → ∞ (kl-vs-mse Eq. 5): ``∂(T²·KD)/∂z^s → (1/K)(d − mean(d))``; the relative error should shrink like 1/T.
* τ → 0 (kl-vs-mse Eq. 6): ``(1/T)·∂(T²·KD)/∂z^s = p^s(T) − p^t(T) → 1[argmax z^s] − 1[argmax z^t]``.
* equal-mean equivalence (kd-vs-logit-matching Eq. 7, 8): at large T the KD gradient differs from the logit-matching
  gradient ``(1/K) d`` only by the logit-mean gap ``mean(d)/K``; once the student's logit mean equals the teacher's the
  two coincide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdlab.errors import KdlabError

DEFAULT_TEMPERATURES = (1e-3, 1e-2, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1e3, 1e4)


def kd_logit_grad(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample gradient of ``T²·KL(p^t ‖ p^s)`` (``kdlab.losses.kd``) with respect to the student logits."""
    from kdlab.losses import kd

    zs = student.detach().double().clone().requires_grad_(True)
    loss = kd(zs, teacher.detach().double(), temperature) * len(zs)
    (grad,) = torch.autograd.grad(loss, zs)
    return grad


def ce_logit_grad(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample gradient of the cross-entropy (``kdlab.losses.cross_entropy``) with respect to the logits."""
    from kdlab.losses import cross_entropy

    z = logits.detach().double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cross_entropy(z, target.long()) * len(z), z)
    return grad


def kd_inf_grad(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The τ → ∞ limit of the T²·KD gradient, ``(1/K)(d − mean(d))`` (kl-vs-mse Eq. 5)."""
    d = student.double() - teacher.double()
    return (d - d.mean(dim=1, keepdim=True)) / d.shape[1]


def lm_grad(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Gradient of logit matching ``(1/2K)‖z^t − z^s‖²`` (kd-vs-logit-matching Eq. 2): ``(1/K) d``."""
    d = student.double() - teacher.double()
    return d / d.shape[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else float("nan")


def theory_checks(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
) -> dict[str, Any]:
    """All the checks of this module on N×K student and teacher logits; JSON-ready numbers."""
    if student.shape != teacher.shape or student.dim() != 2:
        raise KdlabError(f"theory checks need equal N×K logits, got {list(student.shape)} and {list(teacher.shape)}")
    zs, zt = student.double(), teacher.double()
    k = zs.shape[1]
    temps = sorted(float(t) for t in temperatures)
    g_inf, g_lm = kd_inf_grad(zs, zt), lm_grad(zs, zt)
    onehot = torch.nn.functional.one_hot
    ind = (onehot(zs.argmax(1), k) - onehot(zt.argmax(1), k)).double()

    zero_sum, rel_inf, err_zero = [], [], []
    for t in temps:
        g = kd_logit_grad(zs, zt, t)
        scale = float(g.abs().sum(dim=1).mean()) or 1.0
        zero_sum.append(float(g.sum(dim=1).abs().max()) / scale)
        rel_inf.append(_rel(g, g_inf))
        err_zero.append(float((g / t - ind).abs().mean()))

    big = [(t, e) for t, e in zip(temps, rel_inf) if t >= 16 and e > 0]
    slope = None
    if len(big) >= 2:
        slope = float(np.polyfit(np.log([t for t, _ in big]), np.log([e for _, e in big]), 1)[0])

    # equal-mean equivalence, on the raw logits and with the student's logit mean moved onto the teacher's
    t_max = temps[-1]
    g_big = kd_logit_grad(zs, zt, t_max)
    zs_eq = zs - zs.mean(dim=1, keepdim=True) + zt.mean(dim=1, keepdim=True)
    g_big_eq = kd_logit_grad(zs_eq, zt, t_max)
    gap = (zs.mean(dim=1) - zt.mean(dim=1))
    mean_part = (gap / k).unsqueeze(1).expand_as(g_lm)
    out: dict[str, Any] = {
        "num_samples": len(zs),
        "num_classes": k,
        "temperatures": temps,
        "zero_mean_gradient": {
            "kd_max_abs_row_sum_rel": zero_sum,
            "kd_worst": max(zero_sum),
            "holds": max(zero_sum) < 1e-9,
        },
        "tau_infinity": {
            "rel_error": rel_inf,
            "loglog_slope_T_ge_16": slope,
            "holds": rel_inf[-1] < 1e-2 if temps[-1] >= 100 else None,
        },
        "tau_zero": {
            "mean_abs_error": err_zero,
            "holds": err_zero[0] < 1e-2 if temps[0] <= 1e-2 else None,
        },
        "equal_mean": {
            "student_logit_mean": float(zs.mean()),
            "teacher_logit_mean": float(zt.mean()),
            "mean_abs_gap": float(gap.abs().mean()),
            "T": t_max,
            "kd_vs_lm_rel_diff": _rel(g_big, g_lm),
            "predicted_by_mean_gap": float(mean_part.norm()) / float(g_lm.norm()) if float(g_lm.norm()) else None,
            "kd_vs_lm_rel_diff_equal_mean": _rel(g_big_eq, lm_grad(zs_eq, zt)),
        },
    }
    if labels is not None:
        g_ce = ce_logit_grad(zs, labels)
        scale = float(g_ce.abs().sum(dim=1).mean()) or 1.0
        worst = float(g_ce.sum(dim=1).abs().max()) / scale
        out["zero_mean_gradient"]["ce_max_abs_row_sum_rel"] = worst
        out["zero_mean_gradient"]["holds"] = bool(out["zero_mean_gradient"]["holds"] and worst < 1e-9)
    for key in ("tau_infinity", "tau_zero"):
        out[key] = {k2: (None if isinstance(v, float) and math.isnan(v) else v) for k2, v in out[key].items()}
    return out
