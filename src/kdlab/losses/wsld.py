"""Weighted soft-label distillation (WSLD; Zhou et al., ICLR 2021, "Rethinking soft labels for knowledge
distillation: a bias-variance tradeoff perspective"), soft term as released (``WSLDistiller``)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def wsld(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """WSLD's weighted soft term (the paper's Eq. 7 weighting; no CE, which the method adds).

    ``T² · mean_b(w_b · CE_b)`` with ``CE_b = −Σ_k softmax(t/T)_k · log_softmax(s/T)_k`` (a cross-entropy, not a
    KL divergence) and ``w_b = 1 − exp(−max(ce^s_b / (ce^t_b + 1e-7), 0))``, where ``ce^s``, ``ce^t`` are the
    hard-label cross-entropies of the raw (T = 1) student and teacher logits; no gradient flows through ``w``.
    """
    t = float(temperature)
    soft = -(F.softmax(teacher_logits.detach() / t, dim=1) * F.log_softmax(student_logits / t, dim=1)).sum(dim=1)
    with torch.no_grad():
        ce_s = F.cross_entropy(student_logits.detach(), target, reduction="none")
        ce_t = F.cross_entropy(teacher_logits.detach(), target, reduction="none")
        w = 1.0 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp(min=0.0))
    return t * t * (w * soft).mean()


__all__ = ["wsld"]
