"""Multi-stage feature losses: attention transfer, similarity preservation, neuron selectivity transfer, ReviewKD's
hierarchical context loss, factor transfer, activation boundaries and OFD's partial L2.

Pure functions of one stage's student and teacher features (``hcl``: lists of stages), student first. Feature maps
are channels-first, N×C×H×W or N×C×L (1-D CNNs; "height" is then the length). None of these papers is in
``shared/papers``: each function follows the released code that the kdlab comparison tables are run with — mdistiller
(``mdistiller/distillers/{AT,SP,NST,ReviewKD,OFD}.py``), identical to RepDistiller's ``distiller_zoo`` for AT, SP and
NST — or RepDistiller (FT, AB), and the docstrings state those conventions. The methods weight and sum them over stages (:mod:`kdlab.methods.stage`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F


def _need_map(x: torch.Tensor, what: str) -> None:
    if x.dim() not in (3, 4):
        raise ValueError(f"{what}: needs N×C×H×W or N×C×L feature maps, got a tensor of shape {tuple(x.shape)}")


def _pool_height(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pooling to ``size`` (1-D) or ``size``×``size`` (2-D)."""
    return F.adaptive_avg_pool1d(x, size) if x.dim() == 3 else F.adaptive_avg_pool2d(x, (size, size))


def match_heights(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released pooling rule of AT / NST / FT: only heights are compared; the map with the larger height is
    adaptive-average-pooled to the smaller H×H (H for 1-D maps)."""
    sh, th = student.shape[2], teacher.shape[2]
    if sh > th:
        student = _pool_height(student, th)
    elif sh < th:
        teacher = _pool_height(teacher, sh)
    return student, teacher


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention of a map: per sample the channel mean of ``f**p``, flattened and L2-normalised (norm floored
    at 1e-12). Zagoruyko & Komodakis 2017, "Paying more attention to attention", Eq. 2 (F_sum^p, mean over channels
    as released) with the normalisation of Eq. 3."""
    return F.normalize(feature.pow(p).mean(1).reshape(feature.shape[0], -1), dim=1, eps=1e-12)


def at(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer for one stage (AT paper Eq. 3 in the released form).

    Heights matched by :func:`match_heights`; loss = mean over samples and positions of the squared difference of the
    two :func:`attention_map` s (mdistiller ``single_stage_at_loss``; RepDistiller ``Attention.at_loss``). Channel
    counts may differ.
    """
    _need_map(student_feature, "at")
    _need_map(teacher_feature, "at")
    s, t = match_heights(student_feature, teacher_feature)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """B×B Gram matrix of the per-sample flattened features, rows L2-normalised (floor 1e-12)."""
    f = feature.reshape(feature.shape[0], -1)
    return F.normalize(f @ f.t(), dim=1, eps=1e-12)


def sp(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD for one stage (Tung & Mori 2019, Eq. 3-4 as released).

    ``Σ (G_t − G_s)² / B²`` with ``G`` = :func:`similarity_matrix` (mdistiller ``similarity_loss``). Works for maps
    and vectors of any widths (only the batch size must agree).
    """
    b = student_feature.shape[0]
    if teacher_feature.shape[0] != b:
        raise ValueError(f"sp: student batch {b} and teacher batch {teacher_feature.shape[0]} differ")
    diff = similarity_matrix(teacher_feature) - similarity_matrix(student_feature)
    return diff.pow(2).sum() / (b * b)


def _poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over samples and channel pairs of the polynomial kernel ``(x·y)²`` (d = 2, c = 0).

    ``Σ_ij (a_i·b_j)² = ‖A Bᵀ‖²_F = ⟨AᵀA, BᵀB⟩_F``: the HW×HW Gram form is used when it is the smaller one (late
    stages: few positions, many channels), ~10× faster than the C×C one there.
    """
    n, ca, hw = a.shape
    if hw * hw < ca * b.shape[1]:
        at = a.transpose(1, 2)
        gram_a = torch.bmm(at, a)
        gram_b = gram_a if b is a else torch.bmm(b.transpose(1, 2), b)
        return (gram_a * gram_b).sum() / (n * ca * b.shape[1])
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Neuron selectivity transfer for one stage (Huang & Wang 2017, the squared MMD of Eq. 4 with the polynomial
    kernel, as released).

    Heights matched by :func:`match_heights`; each map reshaped to B×C×HW and every channel's spatial vector
    L2-normalised; with k(x, y) = (x·y)² averaged over samples and channel pairs, loss = mean k(t, t) + mean k(s, s)
    − 2 mean k(s, t) (mdistiller ``single_stage_nst_loss``). Channel counts may differ.
    """
    _need_map(student_feature, "nst")
    _need_map(teacher_feature, "nst")
    s, t = match_heights(student_feature, teacher_feature)
    s = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2, eps=1e-12)
    t = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2, eps=1e-12)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2 * _poly_kernel_mean(s, t)


def hcl(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (Chen et al. 2021, "Distilling knowledge via knowledge review", Eq. 7 as
    released in ``hcl_loss``), summed over stages.

    Per stage (equal shapes): the MSE of the two maps with weight 1, plus for each pool size 4, 2, 1 strictly smaller
    than the height, the MSE of both maps adaptive-average-pooled to that size, with weights 0.5, 0.25, 0.125 (halving
    from 0.5 over the sizes actually used); the sum is divided by the total weight. Vectors (N×C) and 1×1 maps are
    plain MSE.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"hcl: {len(student_features)} student stages but {len(teacher_features)} teacher stages")
    total = student_features[0].new_zeros(())
    for s, t in zip(student_features, teacher_features):
        if s.shape != t.shape:
            raise ValueError(f"hcl: student stage {tuple(s.shape)} and teacher stage {tuple(t.shape)} differ")
        loss = F.mse_loss(s, t)
        weight, tot = 1.0, 1.0
        h = s.shape[2] if s.dim() > 2 else 1
        for size in (4, 2, 1):
            if size >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(_pool_height(s, size), _pool_height(t, size))
            tot += weight
        total = total + loss / tot
    return total


def ft(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Factor transfer (Kim et al. 2018, "Paraphrasing complex network", Eq. 4 with the L1 distance, as released in
    RepDistiller ``FactorTransfer``): heights matched by :func:`match_heights`, then the mean absolute difference of
    the two factors' :func:`attention_map` s (p = 2). The factors are the translator's output (student) and the
    paraphraser's encoding (teacher)."""
    _need_map(student_factor, "ft")
    _need_map(teacher_factor, "ft")
    s, t = match_heights(student_factor, teacher_factor)
    return (attention_map(s, p) - attention_map(t, p)).abs().mean()


def ab(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """Activation-boundary loss for one stage (Heo et al. 2019, Eq. 5, the "alternative L2" of the release
    ``criterion_alternative_l2``), divided by the batch size.

    ``Σ (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0]`` over all elements, ``/ B``: the student's
    pre-activation (through the connector) is pushed beyond ±margin on the side where the teacher's neuron is
    active / inactive. RepDistiller further weights stage i of n by 2^(i−n+1) and scales by 3/1000 (the method does).
    """
    s, t = student_feature, teacher_feature
    loss = (s + margin).pow(2) * ((s > -margin) & (t <= 0)) + (s - margin).pow(2) * ((s <= margin) & (t > 0))
    return loss.abs().sum() / s.shape[0]


def ofd_margin(bn_weight: torch.Tensor, bn_bias: torch.Tensor) -> torch.Tensor:
    """Per-channel margin of OFD (Heo et al. 2019, "A comprehensive overhaul of feature distillation", Eq. 2): the
    expectation of the teacher's pre-activation given it is negative, for N(bias, |weight|²) — ``m − s·φ(m/s)/Φ(−m/s)``
    — or ``−3s`` where Φ(−m/s) ≤ 0.001 (as released)."""
    s, m = bn_weight.abs().double(), bn_bias.double()
    cdf = 0.5 * torch.erfc((m / s) / math.sqrt(2.0))  # Φ(−m/s)
    pdf = torch.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi)
    margin = torch.where(cdf > 0.001, -s * pdf / cdf.clamp_min(1e-300) + m, -3 * s)
    return margin.to(bn_weight.dtype)


def ofd(student_feature: torch.Tensor, teacher_feature: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """OFD's partial L2 distance for one stage (Heo et al. 2019, Eq. 4; mdistiller ``feat_loss``).

    With ``s`` the connected student pre-activation, ``t`` the teacher's (same shape) and ``margin`` broadcast per
    channel: ``(s − m)²·[s > m ∧ t ≤ m] + (s − t)²·[s > t ∧ m < t ≤ 0] + (s − t)²·[t > 0]``, averaged over the batch and
    summed over channels and positions.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(f"ofd: student {tuple(student_feature.shape)} and teacher {tuple(teacher_feature.shape)} differ")
    s, t, m = student_feature, teacher_feature, margin.to(student_feature)
    loss = ((s - m).pow(2) * ((s > m) & (t <= m)) + (s - t).pow(2) * ((s > t) & (t > m) & (t <= 0))
            + (s - t).pow(2) * (t > 0))  # fmt: skip
    return loss.abs().mean(dim=0).sum()


__all__ = ["ab", "at", "attention_map", "ft", "hcl", "match_heights", "nst", "ofd", "ofd_margin", "similarity_matrix",
           "sp"]  # fmt: skip
