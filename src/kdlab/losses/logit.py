"""Logit-based losses: cross-entropy, Hinton KD, logit MSE.

Conventions follow the released implementations the papers compare against, so published numbers are comparable.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Batch-mean cross-entropy with hard labels (L_CE of kl-vs-mse Eq. 2)."""
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T² · mean_batch Σ_k p_t,k (log p_t,k − log p_s,k)`` with ``p = softmax(z / T)``.

    L_KL of kl-vs-mse Eq. 2 (KL(p^t(τ) ‖ p^s(τ))), multiplied by T² as in the released KD code (RepDistiller,
    mdistiller) so that gradient magnitudes do not shrink with the temperature. Computed in log space.
    """
    log_ps = F.log_softmax(student / temperature, dim=1)
    log_pt = F.log_softmax(teacher / temperature, dim=1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    return kl.mean() * temperature**2


def mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Element-wise mean squared error between logits, averaged over batch and classes.

    L_MSE of kl-vs-mse Eq. 9 in the reduction of the authors' released code (mean over all elements; Eq. 9's
    per-sample sum is K times larger).
    """
    return F.mse_loss(student, teacher)
