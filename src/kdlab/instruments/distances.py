"""Per-sample distances and norms (kl-vs-mse Fig. 4).

* Fig. 4a: the pdf of ``‖z^s − z^t‖₂``, the distance between student and teacher logits, sample by sample.
* Fig. 4b: the pdf of ``‖r^s‖₂``, the 2-norm of the student's penultimate representation ("pre-logit"); KL with a large
  τ dilates it through the δ∞ term (kl-vs-mse Eq. 10), MSE does not.

A pdf is a :class:`~kdlab.instruments.logit_stats.Histogram` read as a density (``Histogram.density()``).
"""

from __future__ import annotations

import torch

from kdlab.errors import KdlabError
from kdlab.instruments.logit_stats import Histogram, histogram


def logit_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``‖z^s − z^t‖₂`` of each sample (length N) for N×K student and teacher logits."""
    if student.shape != teacher.shape:
        raise KdlabError(
            f"student logits {list(student.shape)} and teacher logits {list(teacher.shape)} must have the same shape"
        )
    return (student.double() - teacher.double()).norm(dim=1)


def feature_norm(features: torch.Tensor) -> torch.Tensor:
    """``‖r‖₂`` of each sample's penultimate vector (N×D → N; higher-rank features are flattened per sample)."""
    return torch.flatten(features.double(), 1).norm(dim=1)


def pdf(values: torch.Tensor, bins: int = 50) -> Histogram:
    """Histogram of ``values`` whose ``density()`` is the empirical pdf of Fig. 4."""
    return histogram(values, bins)
