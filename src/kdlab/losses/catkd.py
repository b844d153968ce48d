"""Class attention transfer (CAT-KD; Guo et al., CVPR 2023, "Class attention transfer based knowledge
distillation"), as released (GzyAftermath/CAT-KD ``CAT_loss``)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def class_activation_maps(feature: torch.Tensor, classifier_weight: torch.Tensor) -> torch.Tensor:
    """Class activation maps ``CAM_k = Σ_c W_kc f_c`` (N×C×H×W → N×K×H×W): the final linear layer applied as a 1×1
    convolution before pooling (CAT-KD §3.1; the release's converted ``*_test`` models, no bias), so the pooled CAMs
    are the logits less the bias."""
    return torch.einsum("kc,nc...->nk...", classifier_weight, feature)


def catkd(
    student_cams: torch.Tensor, teacher_cams: torch.Tensor, resolution: int = 2, normalize: bool = False
) -> torch.Tensor:
    """CAT loss (CAT-KD Eq. 5): both N×K×H×W CAM stacks adaptive-average-pooled to ``resolution``² (release
    ``CAM_RESOLUTION`` 2 on CIFAR), optionally L2-normalised per map (``IF_NORMALIZE``, off in the CIFAR configs),
    then the element-wise MSE."""
    if student_cams.shape[:2] != teacher_cams.shape[:2]:
        raise ValueError(f"catkd: student CAMs {tuple(student_cams.shape)} and teacher CAMs "
                         f"{tuple(teacher_cams.shape)} differ in batch or class count")  # fmt: skip
    if student_cams.dim() == 4:
        s, t = (F.adaptive_avg_pool2d(c, resolution) for c in (student_cams, teacher_cams))
    else:  # 1-D maps (N×K×L)
        s, t = (F.adaptive_avg_pool1d(c, resolution) for c in (student_cams, teacher_cams))
    if normalize:
        s, t = (F.normalize(c.flatten(2), dim=2) for c in (s, t))
    return F.mse_loss(s, t)


__all__ = ["catkd", "class_activation_maps"]
