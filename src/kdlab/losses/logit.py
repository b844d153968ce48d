"""Logit losses: cross-entropy, Hinton KD and its limits, logit matching (LM, LM′) and logit MSE.

Papers (``/work/shared/papers``): ``kl-vs-mse-in-kd.md`` (Kim et al.), ``kd-vs-logit-matching-equivalence.md``
(Chen et al.), ``logit-standardization-in-kd.md`` (Sun et al.). Conventions follow the released implementations the
papers compare against (T² factor, reductions), so published numbers are comparable. All losses take the student's
logits first, are batch means unless stated otherwise, and accept ``standardize=`` (see
:mod:`kdlab.losses.standardize`), applied to student and teacher alike before anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch.nn import functional as F

from kdlab.losses.standardize import Standardize, standardize as _standardize

Temperature = float | torch.Tensor
Scale = Literal["tau2", "max", "none"] | float

_SCALES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tau2": lambda t: t * t,  # released KD code (Hinton et al.; kl-vs-mse Eq. 2)
    "max": lambda t: torch.where(t >= 1, t * t, t),  # max(τ, τ²), kl-vs-mse Eq. 7
    "none": lambda t: torch.ones_like(t),
}


def as_temperature(temperature: Temperature, like: torch.Tensor) -> torch.Tensor:
    """A temperature as a tensor that broadcasts against ``(B, K)`` logits: shape ``()`` or ``(B, 1)``.

    Accepts a number, a one-element tensor (CTKD's global temperature) or one temperature per sample (``(B,)`` or
    ``(B, 1)``, CTKD's instance-wise temperature).
    """
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(())
    if t.numel() != like.shape[0]:
        raise ValueError(f"temperature has {t.numel()} values for a batch of {like.shape[0]}")
    return t.reshape(-1, 1)


def scale_factor(temperature: torch.Tensor, scale: Scale) -> torch.Tensor:
    """The factor multiplying the KL term: ``"tau2"`` → T², ``"max"`` → max(T, T²) (kl-vs-mse Eq. 7), ``"none"`` → 1,
    a number → that number. Same shape as ``temperature``."""
    if isinstance(scale, str):
        try:
            return _SCALES[scale](temperature)
        except KeyError:
            raise ValueError(f"unknown KD scale {scale!r}; choose one of {sorted(_SCALES)} or a number") from None
    return torch.full_like(temperature, float(scale))


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean cross-entropy with hard labels (L_CE of kl-vs-mse Eq. 2). Its gradient w.r.t. the logits,
    ``p − y``, sums to zero over the classes (kd-vs-logit-matching Eq. 6 / B.3)."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: Temperature = 4.0,
    scale: Scale = "tau2",
    standardize: Standardize = None,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Hinton KD: ``scale(T) · Σ_k p^t_k (log p^t_k − log p^s_k)`` with ``p = softmax(std(z) / T)``.

    L_KL of kl-vs-mse Eq. 2 (= L_KD of kd-vs-logit-matching Eq. 3 times T²), batch mean. ``scale``: ``"tau2"`` (T², the
    released KD code and Eq. 2), ``"max"`` (max(T, T²), kl-vs-mse Eq. 7), ``"none"``, or a number. ``standardize``
    (logit-standardization-in-kd Algorithm 2): the base temperature ``T`` divides the standardized logits and the T²
    factor is kept, as in the authors' release. ``temperature`` may be a tensor with one value per sample (CTKD);
    then each sample's KL is scaled by its own factor. ``reduction="none"`` returns the per-sample losses.
    Computed in log space: finite for any finite logits and temperature.
    """
    t = as_temperature(temperature, student)
    log_ps = F.log_softmax(_standardize(student, standardize) / t, dim=1)
    log_pt = F.log_softmax(_standardize(teacher, standardize) / t, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    per_sample = kl * scale_factor(t, scale).reshape(-1)
    if reduction not in ("mean", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'none'")
    return per_sample if reduction == "none" else per_sample.mean()


def kd_inf(student: torch.Tensor, teacher: torch.Tensor, standardize: Standardize = None) -> torch.Tensor:
    """The T → ∞ limit of T²·KD: batch mean of ``(1/2K) ‖d − d̄‖²`` with ``d = z^s − z^t``.

    Its gradient is ``(1/K)(z^s − z^t) − (1/K²) Σ_j (z^s_j − z^t_j)``, Proposition 1 / Eq. 5 of kl-vs-mse (the
    authors implement τ = ∞ as this handcrafted gradient); the loss equals Eq. 8 there,
    ``(1/2K)‖z^s − z^t‖² + δ_∞`` with ``δ_∞ = −(1/2K²)(Σz^s − Σz^t)²``.
    """
    d = _standardize(student, standardize) - _standardize(teacher, standardize)
    d = d - d.mean(dim=1, keepdim=True)
    return d.square().sum(dim=1).mean() / (2 * d.shape[1])


def lm(student: torch.Tensor, teacher: torch.Tensor, standardize: Standardize = None) -> torch.Tensor:
    """Logit matching ``L_LM = (1/2K) ‖z^t − z^s‖²`` (kd-vs-logit-matching Eq. 2), batch mean.

    Gradient ``(z^s − z^t)/K``; with equal logit means it is the T → ∞ limit of T²·KD (that paper's main result).
    """
    d = _standardize(student, standardize) - _standardize(teacher, standardize)
    return d.square().sum(dim=1).mean() / (2 * d.shape[1])


def lm_offset(
    student: torch.Tensor,
    teacher: torch.Tensor,
    c_s: float | torch.Tensor,
    c_t: float | torch.Tensor,
    as_printed: bool = False,
    standardize: Standardize = None,
) -> torch.Tensor:
    """Logit matching with the mean-offset regulariser, L_LM′ of kd-vs-logit-matching Eq. 8, batch mean:
    ``(1/2K)‖z^t − z^s‖² ∓ ((c^s − c^t)/K) Σ_i z^s_i``.

    ``c_s``, ``c_t``: the (constant) logit means of student and teacher, numbers or one value per sample; tensors are
    detached. With ``c = z̄`` its gradient equals that of :func:`kd_inf` (the T → ∞ limit of T²·KD).

    Sign: the paper prints ``+`` (Eq. 7: ``(1/K)(z^s_i − z^t_i + c^s − c^t)``), which contradicts its own Eq. 4 step ③
    expansion carried out correctly and kl-vs-mse Eq. 5: T(p^s − p^t) → (1/K)((z^s_i − c^s) − (z^t_i − c^t)). The
    default (``as_printed=False``) uses the correct ``−``; ``as_printed=True`` reproduces Eq. 8 literally.
    """
    s = _standardize(student, standardize)
    t = _standardize(teacher, standardize)
    k = s.shape[1]
    cs = torch.as_tensor(c_s, dtype=s.dtype, device=s.device).detach()
    ct = torch.as_tensor(c_t, dtype=s.dtype, device=s.device).detach()
    offset = ((cs - ct).reshape(-1) if (cs - ct).numel() > 1 else (cs - ct).reshape(())) / k
    sign = 1.0 if as_printed else -1.0
    reg = sign * offset * s.sum(dim=1)
    return ((t - s).square().sum(dim=1) / (2 * k) + reg).mean()


def mse(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: Literal["mean", "sum"] = "mean",
    standardize: Standardize = None,
) -> torch.Tensor:
    """Logit MSE, L_MSE of kl-vs-mse Eq. 9.

    ``reduction="mean"`` (default): element-wise mean over batch and classes, the convention of the authors' released
    code (``nn.MSELoss()``). ``reduction="sum"``: ``‖z^s − z^t‖²`` per sample as printed in Eq. 9, then batch mean
    (K times larger).
    """
    d = _standardize(student, standardize) - _standardize(teacher, standardize)
    per_sample = d.square().sum(dim=1)
    if reduction == "sum":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / d.shape[1]
    raise ValueError(f"unknown reduction {reduction!r}; choose 'mean' or 'sum'")
