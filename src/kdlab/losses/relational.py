"""Relational and contrastive embedding losses: RKD, PKT and CRD's NCE objective.

Pure functions on N×… embeddings (flattened per sample), student first. They follow the released code conventions
(RepDistiller / mdistiller), which the tests check against float64 references written from those conventions.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Pairwise Euclidean distances, squared distance clamped ≥ ``eps`` before the root, zero diagonal, divided by
    the mean of the off-diagonal entries."""
    sq = e.square().sum(dim=1)
    d = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp(min=eps).sqrt()
    off = ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    d = d * off
    return d / d[off].mean()


def _angles(e: torch.Tensor) -> torch.Tensor:
    """Cosines ⟨u_ij, u_ik⟩ of the unit vectors u_ij = (e_j − e_i)/‖e_j − e_i‖ (zero vector → 0), B×B×B."""
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)
    return u @ u.transpose(1, 2)


def rkd(
    student_embedding: torch.Tensor,
    teacher_embedding: torch.Tensor,
    distance_weight: float = 25.0,
    angle_weight: float = 50.0,
) -> torch.Tensor:
    """Relational KD (Park et al., CVPR 2019, Eqs. 2-5) as released (RepDistiller / mdistiller ``rkd_loss``).

    Inputs are flattened per sample. Distance term: smooth-L1 (β = 1) between the B×B distance matrices, each
    divided by the mean of its off-diagonal entries, averaged over B². Angle term: smooth-L1 between the B×B×B
    cosines of the angles formed by every triple, averaged over B³. The teacher side carries no gradient.
    Returns ``distance_weight · distance + angle_weight · angle``.
    """
    s = student_embedding.flatten(1)
    t = teacher_embedding.detach().flatten(1)
    if len(s) < 2:
        raise ValueError(f"rkd needs at least 2 samples per batch, got {len(s)}")
    loss = s.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * F.smooth_l1_loss(_distances(s), _distances(t))
    if angle_weight:
        loss = loss + angle_weight * F.smooth_l1_loss(_angles(s), _angles(t))
    return loss


def _pkt_probabilities(e: torch.Tensor, eps: float) -> torch.Tensor:
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    sim = (e @ e.T + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018, Eqs. 7-10), as released (RepDistiller
    ``PKT.cosine_similarity_loss``).

    Rows are divided by (L2 norm + eps); the cosine matrix is mapped to (S + 1)/2 and each row scaled to sum 1
    (conditional probabilities P); loss = mean over B² of P_t · log((P_t + eps)/(P_s + eps)).
    """
    ps = _pkt_probabilities(student_embedding.flatten(1), eps)
    pt = _pkt_probabilities(teacher_embedding.detach().flatten(1), eps)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def crd_nce(scores: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., ICLR 2020, Eq. 18) as released (RepDistiller ``ContrastLoss``).

    ``scores`` is B×(1+K): column 0 the (normalised, exponentiated) score of the positive pair, the other K columns
    those of K noise samples; noise distribution uniform, P_n = 1/``num_data``. With m = K:
    ``−(Σ_b log(P⁺/(P⁺ + m·P_n + eps)) + Σ_{b,k} log(m·P_n/(P⁻ + m·P_n + eps))) / B``.
    """
    b, m = scores.shape[0], scores.shape[1] - 1
    mpn = m / num_data
    pos = torch.log(scores[:, 0] / (scores[:, 0] + mpn + eps))
    neg = torch.log(mpn / (scores[:, 1:] + mpn + eps))
    return -(pos.sum() + neg.sum()) / b


__all__ = ["crd_nce", "pkt", "rkd"]
