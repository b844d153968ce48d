"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022), computed in log space.

Reference: the released ``dkd_loss`` of mdistiller (``mdistiller/distillers/DKD.py``), also used with logit
standardization by logit-standardization-in-kd.md (Tables 1–3, 5). KD's KL splits into

* TCKD: KL between the binary distributions ``b = [p_target, 1 − p_target]`` of teacher and student;
* NCKD: KL between the distributions over the non-target classes.

The release computes ``b`` with ``softmax`` then ``torch.log``, which gives ``log 0 = −inf`` and a NaN loss once a
probability underflows (float32 logits of magnitude ~1e3). Here ``log b`` comes from ``logsumexp``: the same
numbers on moderate logits, finite on any finite logits.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from kdlab.losses.logit import Temperature, as_temperature
from kdlab.losses.standardize import Standardize, standardize as _standardize


def _binary_log_probs(x: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``log [p_target, 1 − p_target]`` of ``softmax(x)``, shape ``(B, 2)``, without forming ``p``."""
    lse = torch.logsumexp(x, dim=1)
    log_p_gt = (x * gt).sum(dim=1) - lse  # exact: gt is one-hot
    log_p_rest = torch.logsumexp(x.masked_fill(gt, float("-inf")), dim=1) - lse
    return torch.stack([log_p_gt, log_p_rest], dim=1)


def _kl_rows(log_pt: torch.Tensor, log_ps: torch.Tensor) -> torch.Tensor:
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)


def _gt_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] < 2:
        raise ValueError("DKD needs at least two classes")
    return F.one_hot(target.reshape(-1), logits.shape[1]).bool()


def tckd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature = 4.0,
    standardize: Standardize = None,
) -> torch.Tensor:
    """Target-class KD: ``T² · mean_batch KL(b^t ‖ b^s)``, ``b = [p_target, 1 − p_target]`` of ``softmax(z/T)``.

    The release's ``kl_div(..., size_average=False) * T² / B``; log-space, finite for any finite logits.
    """
    gt = _gt_mask(student, target)
    t = as_temperature(temperature, student)
    log_bs = _binary_log_probs(_standardize(student, standardize) / t, gt)
    log_bt = _binary_log_probs(_standardize(teacher, standardize) / t, gt)
    return (_kl_rows(log_bt, log_bs) * (t * t).reshape(-1)).mean()


def nckd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: Temperature = 4.0,
    standardize: Standardize = None,
    gt_offset: float | None = 1000.0,
) -> torch.Tensor:
    """Non-target-class KD: ``T² · mean_batch KL(p̂^t ‖ p̂^s)`` over the non-target classes.

    ``gt_offset=1000`` (default) is the release: ``p̂ = softmax(z/T − 1000·onehot(target))``, which leaves a
    vanishing mass on the target class when ``|z/T| ≪ 1000``. ``gt_offset=None`` removes the target class exactly
    (its logit set to −∞ before the softmax), the definition in the DKD paper.
    """
    gt = _gt_mask(student, target)
    t = as_temperature(temperature, student)
    xs = _standardize(student, standardize) / t
    xt = _standardize(teacher, standardize) / t
    if gt_offset is None:
        log_ps = F.log_softmax(xs.masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
        log_pt = F.log_softmax(xt.masked_fill(gt, float("-inf")), dim=1).masked_fill(gt, 0.0)
    else:
        log_ps = F.log_softmax(xs - gt_offset * gt, dim=1)
        log_pt = F.log_softmax(xt - gt_offset * gt, dim=1)
    return (_kl_rows(log_pt, log_ps) * (t * t).reshape(-1)).mean()


def dkd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: Temperature = 4.0,
    standardize: Standardize = None,
    gt_offset: float | None = 1000.0,
) -> torch.Tensor:
    """Decoupled KD ``α·TCKD + β·NCKD`` (the DKD paper's objective; released ``dkd_loss``), each term T² · batch
    mean.

    Defaults α = 1, β = 8, T = 4 are the released CIFAR-100 settings. ``standardize`` is applied to both logits
    before the temperature (logit-standardization-in-kd, "DKD+Ours"). The warm-up factor ``min(epoch/20, 1)`` of
    the release is applied by the ``dkd`` method, not here.
    """
    return alpha * tckd(student, teacher, target, temperature, standardize) + beta * nckd(
        student, teacher, target, temperature, standardize, gt_offset
    )
