"""Variational information distillation (VID; Ahn et al., CVPR 2019), loss as released (RepDistiller ``VIDLoss``)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def vid_variance(log_scale: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """VID's per-channel variance σ²_c = softplus(α_c) + eps (VID Eq. 6; release ``log(1 + exp(log_scale)) + eps``)."""
    return F.softplus(log_scale) + eps


def vid(predicted_mean: torch.Tensor, teacher_feature: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """VID negative log-likelihood of the teacher feature under a Gaussian with the regressed student mean μ(s) and a
    per-channel variance σ² (VID Eq. 5 without its constant): ``mean(½ ((μ − t)²/σ² + log σ²))`` over every element.

    ``predicted_mean`` and ``teacher_feature`` are N×C×… maps of the same shape (RepDistiller pools the larger map
    to the smaller first); ``variance`` holds the C channel variances.
    """
    if predicted_mean.shape != teacher_feature.shape:
        raise ValueError(f"vid: predicted mean {tuple(predicted_mean.shape)} and teacher feature "
                         f"{tuple(teacher_feature.shape)} differ")  # fmt: skip
    var = variance.reshape(1, -1, *([1] * (teacher_feature.dim() - 2)))
    return (0.5 * ((predicted_mean - teacher_feature).square() / var + torch.log(var))).mean()


__all__ = ["vid", "vid_variance"]
