"""Classifier alignment μ = ‖W_t − W_s‖_F and its correlation with the training loss (reusing-teacher-classifier).

The paper records μ, the Frobenius norm of the difference between the teacher's and the student's final-layer weight
matrices, every epoch, and reports its Pearson correlation with the training loss over epochs: strongly positive
under KD (0.972), strongly negative under plain CE training (−0.971), computed after the warm-up epochs (the first
half of training). The cosine similarity of the flattened weights is recorded too (the paper's appendix A.1).

μ needs equal classifier shapes (same number of classes and same penultimate width); otherwise a one-line error.
Per-epoch callback: ``instruments: [alignment]`` records ``align_mu`` and ``align_cos`` into ``metrics.jsonl``. A CE run
names the reference teacher in its config (``teacher.name`` / ``teacher.checkpoint``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdlab.engine.callbacks import CALLBACKS, Callback
from kdlab.errors import ConfigError, KdlabError

if TYPE_CHECKING:
    from kdlab.engine.trainer import Trainer


@dataclass
class Alignment:
    mu: float  # ‖W_t − W_s‖_F
    cosine: float  # <W_t, W_s>_F / (‖W_t‖_F ‖W_s‖_F)


def check_same_shape(w_teacher: torch.Tensor, w_student: torch.Tensor) -> None:
    """Raise a one-line error unless the two classifier weight matrices have the same shape."""
    if tuple(w_teacher.shape) != tuple(w_student.shape):
        raise KdlabError(
            f"classifier alignment needs equal classifier shapes: teacher {list(w_teacher.shape)} vs student "
            f"{list(w_student.shape)} (classes × penultimate width); use a teacher/student pair with the same "
            "penultimate width"
        )


def classifier_alignment(w_teacher: torch.Tensor, w_student: torch.Tensor) -> Alignment:
    """μ = ‖W_t − W_s‖_F and the cosine similarity of the two weight matrices (reusing-teacher-classifier §2)."""
    check_same_shape(w_teacher, w_student)
    t, s = w_teacher.detach().double(), w_student.detach().double()
    mu = float((t - s).norm())
    denom = float(t.norm() * s.norm())
    cos = float((t * s).sum()) / denom if denom > 0 else float("nan")
    return Alignment(mu, cos)


@dataclass
class Correlation:
    r: float
    p: float | None  # two-sided p-value of r = 0 (t test with n − 2 degrees of freedom); None without scipy
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"r": self.r, "p": self.p, "n": self.n}


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> Correlation:
    """Pearson correlation coefficient of paired values with its two-sided p-value."""
    xv, yv = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xv.shape != yv.shape or xv.ndim != 1:
        raise KdlabError(f"pearson needs two equally long 1-D sequences, got {xv.shape} and {yv.shape}")
    n = len(xv)
    if n < 3:
        raise KdlabError(f"pearson correlation needs at least 3 pairs, got {n}")
    dx, dy = xv - xv.mean(), yv - yv.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0:
        return Correlation(float("nan"), None, n)
    r = float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))
    return Correlation(r, _p_value(r, n), n)


def _p_value(r: float, n: int) -> float | None:
    try:
        from scipy.special import betainc
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        return None
    df = n - 2
    if abs(r) >= 1.0:
        return 0.0
    t2 = r * r * df / (1.0 - r * r)
    return float(betainc(df / 2.0, 0.5, df / (df + t2)))


def alignment_loss_correlation(
    rows: Sequence[dict[str, Any]], mu_key: str = "align_mu", loss_key: str = "train_loss", skip_epochs: int = 0
) -> Correlation | None:
    """Pearson r between μ and the training loss over the epochs of ``metrics.jsonl`` rows after ``skip_epochs``.

    None when fewer than 3 epochs carry both values.
    """
    pairs = [
        (float(r[mu_key]), float(r[loss_key]))
        for r in rows
        if r.get("epoch", 0) > skip_epochs and r.get(mu_key) is not None and r.get(loss_key) is not None
    ]
    if len(pairs) < 3:
        return None
    mu, loss = zip(*pairs)
    return pearson(mu, loss)


# --------------------------------------------------------------------------------------------------------------------
# per-epoch callback


@CALLBACKS.register("alignment")
class AlignmentCallback(Callback):
    """Records ``align_mu`` = ‖W_t − W_s‖_F and ``align_cos`` after every epoch (cost: one K×D subtraction)."""

    def __init__(self) -> None:
        self.w_teacher: torch.Tensor | None = None

    def setup(self, trainer: Trainer) -> None:
        from kdlab.instruments.reference import reference_teacher

        teacher = reference_teacher(trainer)
        if teacher is None:
            raise ConfigError(
                "instrument 'alignment' needs a teacher classifier: set teacher.name and teacher.checkpoint "
                "(a run without distillation may name one as a reference)"
            )
        w_t, w_s = _classifier_weight(teacher, "teacher"), _classifier_weight(trainer.student, "student")
        try:
            check_same_shape(w_t, w_s)
        except KdlabError as err:
            raise ConfigError(f"instrument 'alignment': {err}") from None
        self.w_teacher = w_t.detach().clone().to(trainer.device)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        assert self.w_teacher is not None
        with torch.no_grad():
            w_s = _classifier_weight(trainer.student, "student").detach()
            mu = (self.w_teacher - w_s).norm()
            cos = (self.w_teacher * w_s).sum() / (self.w_teacher.norm() * w_s.norm())
            row: dict[str, Any] = {"align_mu": mu.item(), "align_cos": cos.item()}
        row["instr_alignment_s"] = round(time.perf_counter() - t0, 5)
        return row


def _classifier_weight(model: torch.nn.Module, who: str) -> torch.Tensor:
    clf = getattr(model, "classifier", None)
    weight = getattr(clf, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ConfigError(f"instrument 'alignment': the {who} model exposes no final linear classifier (.classifier)")
    return weight
