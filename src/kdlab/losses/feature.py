"""Feature and teacher-classifier losses: FitNet, SRRL, SimKD, IJCKD.

Pure functions. ``student_feat`` is always the *connected* student feature (already mapped into the teacher's feature
space by a connector, :mod:`kdlab.models.connectors`); features are N×C×H×W / N×C×L maps or N×D vectors.
``teacher_classifier`` is any callable mapping pooled N×D features to logits (the teacher's final linear layer,
normally frozen: gradients flow *through* it to the student, never into it). Reductions follow the released code:
``F.mse_loss`` with its element-wise mean, ``F.cross_entropy`` with the batch mean.

Paper references: ideal-joint-classifier-kd (IJCKD, Li et al.) Algorithms 1-3 and Eqs. 6-8; SimKD (Chen et al.
2022, "Knowledge distillation with the reused teacher classifier"); SRRL (Yang et al. 2021, "Knowledge distillation
via softmax regression representation learning"); FitNets (Romero et al. 2015).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from kdlab.models.base import global_pool

Classifier = Callable[[torch.Tensor], torch.Tensor]


def _same_shape(student_feat: torch.Tensor, teacher_feat: torch.Tensor, what: str) -> None:
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"{what}: student feature {tuple(student_feat.shape)} and teacher feature {tuple(teacher_feat.shape)} "
            "differ; connect the student and pool the larger map first (kdlab.models.connectors.align_teacher)"
        )


def fitnet(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets hint loss: element-wise MSE between the regressed student map and the teacher's hint map.

    FitNets Eq. 3 (½‖u_h − r(v_g)‖²) in the reduction of RepDistiller / mdistiller (``nn.MSELoss()``: mean over
    all elements, no ½).
    """
    _same_shape(student_feat, teacher_feat, "fitnet")
    return F.mse_loss(student_feat, teacher_feat)


def simkd(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """SimKD feature loss: element-wise MSE between the connected student map and the teacher map.

    ideal-joint-classifier-kd Algorithm 2 (``F.mse_loss(connector(feat_s), feat_t)``); SimKD's released code
    (``nn.MSELoss()`` on the spatially aligned maps).
    """
    _same_shape(student_feat, teacher_feat, "simkd")
    return F.mse_loss(student_feat, teacher_feat)


def srrl(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    teacher_classifier: Classifier,
    teacher_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SRRL's two terms ``(feature_term, logit_term)``.

    ``feature_term`` = MSE between the spatially pooled connected student feature and the pooled teacher feature
    (SRRL's feature-matching loss on the penultimate representation); ``logit_term`` = MSE between the teacher
    classifier applied to the pooled student feature and the teacher's logits — the softmax-regression loss
    l^sr(g_t∘Φ_s, g_t∘Φ_t) of ideal-joint-classifier-kd Eq. 6 in its MSE form (Eq. 8; Algorithm 1 ``loss_lm``).
    """
    s = global_pool(student_feat)
    t = global_pool(teacher_feat)
    _same_shape(s, t, "srrl")
    return F.mse_loss(s, t), F.mse_loss(teacher_classifier(s), teacher_logits)


def ijckd(
    student_feat: torch.Tensor,
    teacher_feat: torch.Tensor,
    teacher_classifier: Classifier,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """IJCKD's terms with the teacher classifier as the ideal joint classifier ĝ (ideal-joint-classifier-kd §3).

    With ``z = teacher_classifier(pool(student_feat))`` (Algorithm 3 ``logits_s``):

    * ``ce``: cross-entropy of ``z`` with the labels, l^ce(y, ĝ∘Φ_s) of Eq. 8;
    * ``logit``: MSE between ``z`` and the teacher's logits, α·l^mse(o^s, o^t) of Eq. 8 (``loss_lm``);
    * ``feature``: element-wise MSE between the connected student map and the teacher map, l^fm (Table 3's
      "l^ce + l^fm" and "l^ce + l^sr + l^fm" combinations).

    The caller weights them (α_ce, α, β; the paper's defaults 1, 1, 0).
    """
    _same_shape(student_feat, teacher_feat, "ijckd")
    logits = teacher_classifier(global_pool(student_feat))
    return {
        "ce": F.cross_entropy(logits, target),
        "logit": F.mse_loss(logits, teacher_logits),
        "feature": F.mse_loss(student_feat, teacher_feat),
    }


__all__ = ["fitnet", "ijckd", "simkd", "srrl"]
