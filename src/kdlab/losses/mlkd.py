"""Multi-level logit distillation (MLKD, Jin et al., CVPR 2023): instance-, batch- and class-level alignment.

Reference: the authors' release (``mdistiller/distillers/KD_ours.py`` of Jin-Ying/Multi-Level-Logit-Distillation;
identical, plus ``logit_stand``, as ``MLKD.py`` in logit-standardization-KD, the "MLKD" rows of
logit-standardization-in-kd.md). At each temperature T in ``(T₀, 3, 5, 2, 6)`` (T₀ = 4 by default):

* instance level: KD, ``T² · KL(p^t ‖ p^s)`` per sample (:func:`mlkd_instance`);
* batch level: the B×B Gram matrices ``P Pᵀ`` of the softened predictions, ``Σ (G^t − G^s)² / B`` (release ``bc_loss``,
  :func:`mlkd_batch`);
* class level: the K×K matrices ``Pᵀ P``, ``Σ (M^t − M^s)² / K`` (release ``cc_loss``, :func:`mlkd_class`);

on a weak and a strong augmentation of every image, with confidence masks from the teacher's weak-view prediction
(:func:`mlkd_masks`).

kdlab follows the release (the MLKD paper itself is not among the project's papers; logit-standardization-in-kd
reports its MLKD numbers with this code). Where the release departs from what its own code evidently intends, the
release is the default and a switch gives the alternative:

1. Masking. The release calls the losses with ``reduce=True`` (``reduce=False`` is commented out), so
   ``(loss * mask).mean()`` multiplies a *scalar* by the mask: the mask acts only as the constant factor
   ``mean(mask)`` (≈ ½), not as a per-sample selection. ``mask_mode="release"`` reproduces this;
   ``mask_mode="per_sample"`` is the commented-out ``reduce=False`` path (per-sample / per-column masking, then the
   mean over all entries); ``mask_mode="none"`` ignores the masks.
2. The masks keep the samples (classes) whose teacher confidence is *at most* the batch median
   (``confidence.le(np.percentile(confidence, 50))``).
3. The strong-view instance term uses the *weak* view's logits at T = 2 and T = 6 (copy-paste in the release), and
   the strong-view batch/class terms are computed but not added to the loss. CE is applied to both views.
4. Logit standardization (``logit_stand``) is applied only to the instance-level KD terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from kdlab.losses.logit import cross_entropy, kd
from kdlab.losses.standardize import Standardize, standardize as _standardize

MaskMode = Literal["release", "per_sample", "none"]
DEFAULT_TEMPERATURES: tuple[float, ...] = (4.0, 3.0, 5.0, 2.0, 6.0)


def mlkd_masks(teacher_weak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence masks of the release from the teacher's weak-view logits (at T = 1, no gradient).

    Sample mask ``(B,)``: ``max_k p^t_k ≤ median`` over the batch. Class mask ``(K,)``: ``Σ_b p^t_bk ≤ median`` over
    the classes. Medians as ``np.percentile(·, 50)`` (linear interpolation, i.e. ``torch.quantile``).
    """
    x = teacher_weak.detach()
    p = F.softmax(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)
    conf = p.max(dim=1).values
    class_conf = p.sum(dim=0)
    return conf <= torch.quantile(conf, 0.5), class_conf <= torch.quantile(class_conf, 0.5)


def _apply_mask(
    per_term: torch.Tensor, total: torch.Tensor, mask: torch.Tensor | None, mask_mode: MaskMode
) -> torch.Tensor:
    """``total`` is the unmasked reduced loss, ``per_term`` the unreduced one (mask broadcasts on its last dim)."""
    if mask is None or mask_mode == "none":
        return total
    m = mask.to(per_term.dtype)
    if mask_mode == "release":
        return total * m.mean()
    if mask_mode == "per_sample":
        return (per_term * m).mean()
    raise ValueError(f"unknown mask_mode {mask_mode!r}; choose 'release', 'per_sample' or 'none'")


def mlkd_instance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    mask: torch.Tensor | None = None,
    mask_mode: MaskMode = "release",
    standardize: Standardize = None,
) -> torch.Tensor:
    """Instance-level alignment: ``Σ_T masked(T² · KL(p^t(T) ‖ p^s(T)))`` (release ``kd_loss`` at every T)."""
    out = student.new_zeros(())
    for t in temperatures:
        per_sample = kd(student, teacher, t, standardize=standardize, reduction="none")
        out = out + _apply_mask(per_sample, per_sample.mean(), mask, mask_mode)
    return out


def _soft(x: torch.Tensor, t: float, standardize: Standardize) -> torch.Tensor:
    return F.softmax(_standardize(x, standardize) / t, dim=1)


def _gram_alignment(
    student: torch.Tensor, teacher: torch.Tensor, temperatures: Sequence[float], mask: torch.Tensor | None,
    mask_mode: MaskMode, standardize: Standardize, gram: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """``Σ_T masked(Σ (gram(P^t) − gram(P^s))² / n)``, n the side of the square Gram matrix (B or K)."""
    out = student.new_zeros(())
    for t in temperatures:
        gs, gt = gram(_soft(student, t, standardize)), gram(_soft(teacher, t, standardize))
        per = (gt - gs).square() / gt.shape[0]
        out = out + _apply_mask(per, per.sum(), mask, mask_mode)
    return out


def mlkd_batch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    mask: torch.Tensor | None = None,
    mask_mode: MaskMode = "release",
    standardize: Standardize = None,
) -> torch.Tensor:
    """Batch-level alignment: ``Σ_T masked(Σ_ij (G^t − G^s)²_ij / B)`` with ``G = P Pᵀ`` (B×B), release ``bc_loss``.

    ``mask`` is the ``(B,)`` sample mask (in ``"per_sample"`` mode it masks the columns ``j``).
    """
    return _gram_alignment(student, teacher, temperatures, mask, mask_mode, standardize, lambda p: p @ p.T)


def mlkd_class(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    mask: torch.Tensor | None = None,
    mask_mode: MaskMode = "release",
    standardize: Standardize = None,
) -> torch.Tensor:
    """Class-level alignment: ``Σ_T masked(Σ_kl (M^t − M^s)²_kl / K)`` with ``M = Pᵀ P`` (K×K), release ``cc_loss``.

    ``mask`` is the ``(K,)`` class mask (in ``"per_sample"`` mode it masks the columns ``l``).
    """
    return _gram_alignment(student, teacher, temperatures, mask, mask_mode, standardize, lambda p: p.T @ p)


def mlkd_terms(
    student_weak: torch.Tensor,
    teacher_weak: torch.Tensor,
    target: torch.Tensor,
    student_strong: torch.Tensor | None = None,
    teacher_strong: torch.Tensor | None = None,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
    standardize: Standardize = None,
    mask_mode: MaskMode = "release",
    release_quirks: bool = True,
    batch_weight: float | None = None,
    class_weight: float | None = None,
) -> dict[str, torch.Tensor]:
    """The released MLKD objective as named, weighted terms ``{"ce", "kd", "cc", "bc"}`` (their sum is the loss).

    * ``ce = ce_weight · (CE(z^s_weak) + CE(z^s_strong))``
    * ``kd = kd_weight · (instance(weak, masked) + instance(strong, unmasked))``
    * ``cc = class_weight · class(weak, class mask)``, ``bc = batch_weight · batch(weak, sample mask)``

    ``batch_weight`` / ``class_weight`` default to ``kd_weight``: the release multiplies all three levels by the one
    KD weight. Separate weights matter when the number of classes K is small: the class term grows like (B/K)², so
    at K = 10 it dominates the loss (see ``configs/mnist1d/student_mlkd_zscore_k10.yaml``).

    ``release_quirks=True`` (default) keeps the release's strong-view instance term, which uses the weak-view logits
    at the 4th and 5th temperatures (T = 2, 6). Without a strong view (``student_strong=None``) the weak view serves
    as both, i.e. the released objective with two identical augmentations. ``standardize`` applies to the
    instance-level terms only, as in the release's ``logit_stand``. The defaults here (T₀ = 4, CE 0.1, KD 0.9) are
    mdistiller's generic ``cfg.KD`` values, not the settings of the published MLKD runs: those (the
    logit-standardization-in-kd release) weight all three levels by KD weight 9, with base temperature 2 under
    Z-score standardization.
    """
    if (student_strong is None) != (teacher_strong is None):
        raise ValueError("pass both student_strong and teacher_strong, or neither")
    if student_strong is None or teacher_strong is None:
        student_strong, teacher_strong = student_weak, teacher_weak
    temps = tuple(float(t) for t in temperatures)
    sample_mask, class_mask = mlkd_masks(teacher_weak)

    kd_weak = mlkd_instance(student_weak, teacher_weak, temps, sample_mask, mask_mode, standardize)
    split = 3 if release_quirks else len(temps)
    kd_strong = mlkd_instance(student_strong, teacher_strong, temps[:split], None, mask_mode, standardize)
    kd_strong = kd_strong + mlkd_instance(student_weak, teacher_weak, temps[split:], None, mask_mode, standardize)
    return {
        "ce": ce_weight * (cross_entropy(student_weak, target) + cross_entropy(student_strong, target)),
        "kd": kd_weight * (kd_weak + kd_strong),
        "cc": (kd_weight if class_weight is None else class_weight)
        * mlkd_class(student_weak, teacher_weak, temps, class_mask, mask_mode),
        "bc": (kd_weight if batch_weight is None else batch_weight)
        * mlkd_batch(student_weak, teacher_weak, temps, sample_mask, mask_mode),
    }
