"""Logit statistics per sample, their histograms, and the per-class teacher–student logit-gap heatmap.

* kl-vs-mse Fig. 2: histogram of the per-sample logit sum ``Σ_k z_k`` (teacher ≈ 0; KD students drift with τ).
* logit-standardization Fig. 5: bivariate histogram of the per-sample logit mean × logit standard deviation.
* logit-standardization Fig. 3 (2nd row): heatmap of the average |z^t − z^s|, raw and after Z-score standardization.

The standard deviation is the population one (ddof = 0), as in Algorithm 1 of the logit-standardization paper.
Also the per-epoch callback ``logit_stats`` (enable with ``instruments: [logit_stats]``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdlab.engine.callbacks import CALLBACKS, Callback
from kdlab.errors import KdlabError

if TYPE_CHECKING:
    from kdlab.engine.trainer import Trainer

STAT_NAMES = ("mean", "sum", "std", "max", "range")


def logit_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample statistics of an N×K logit matrix: ``mean``, ``sum``, ``std`` (ddof 0), ``max``, ``range``.

    ``range`` is ``max − min`` of the row. Each value is a length-N tensor.
    """
    if logits.dim() != 2:
        raise KdlabError(f"logits must be an N×K matrix, got shape {list(logits.shape)}")
    z = logits.double()
    mx, mn = z.max(dim=1).values, z.min(dim=1).values
    return {
        "mean": z.mean(dim=1),
        "sum": z.sum(dim=1),
        "std": z.std(dim=1, correction=0),
        "max": mx,
        "range": mx - mn,
    }


def standardize(logits: torch.Tensor, temperature: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """Z-score of each logit row, ``(z − mean) / std / temperature`` (logit-standardization Algorithm 1, ddof 0).

    A constant row (std 0) maps to zeros.
    """
    z = logits.double()
    centred = z - z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, correction=0, keepdim=True)
    return centred / std.clamp_min(eps) / temperature


@dataclass
class Histogram:
    """Bin ``counts`` (length B) and bin ``edges`` (length B + 1); ``counts.sum()`` is the number of samples."""

    counts: np.ndarray
    edges: np.ndarray

    def density(self) -> np.ndarray:
        """The histogram as a probability density (integrates to 1 over the bins)."""
        total = self.counts.sum()
        return self.counts / (total * np.diff(self.edges)) if total else np.zeros(len(self.counts))

    def to_json(self) -> dict[str, list]:
        return {"counts": self.counts.astype(int).tolist(), "edges": _round(self.edges)}


def histogram(values: torch.Tensor | np.ndarray, bins: int = 50) -> Histogram:
    """Histogram over the full range of ``values`` (every sample falls into exactly one bin)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise KdlabError("histogram of an empty set of values")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):  # one value (or a spread too small for finite-sized bins)
        mid = lo + (hi - lo) / 2
        lo, hi = mid - 0.5, mid + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    return Histogram(counts, edges)


@dataclass
class Histogram2D:
    """``counts[i, j]`` samples with ``x`` in bin i and ``y`` in bin j."""

    counts: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray

    def to_json(self) -> dict[str, list]:
        return {
            "counts": self.counts.astype(int).tolist(),
            "x_edges": _round(self.x_edges),
            "y_edges": _round(self.y_edges),
        }


def histogram2d(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    bins: int = 40,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
) -> Histogram2D:
    """Bivariate histogram of paired values (logit-standardization Fig. 5: x = logit mean, y = logit std).

    Without ranges the bins span all values; with ranges, values outside are not counted.
    """
    xv, yv = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xv.shape != yv.shape:
        raise KdlabError(f"histogram2d needs paired values, got {xv.size} and {yv.size}")
    xr = x_range or _span(xv)
    yr = y_range or _span(yv)
    counts, xe, ye = np.histogram2d(xv, yv, bins=bins, range=(xr, yr))
    return Histogram2D(counts, xe, ye)


def _span(v: np.ndarray) -> tuple[float, float]:
    lo, hi = float(v.min()), float(v.max())
    return (lo - 0.5, hi + 0.5) if lo == hi else (lo, hi)


def class_gap_heatmap(
    teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, num_classes: int, standardized: bool = False
) -> np.ndarray:
    """K×K matrix ``H[c, k]`` = mean over samples of class ``c`` of ``|z^t_k − z^s_k|`` (logit-std. Fig. 3).

    With ``standardized=True`` both logit matrices are Z-scored first (Fig. 3c). Rows of classes without samples are
    NaN.
    """
    if teacher.shape != student.shape:
        raise KdlabError(f"teacher logits {list(teacher.shape)} and student logits {list(student.shape)} differ")
    if teacher.shape[1] != num_classes:
        raise KdlabError(f"logits have {teacher.shape[1]} classes, expected {num_classes}")
    t, s = (standardize(teacher), standardize(student)) if standardized else (teacher.double(), student.double())
    gap = (t - s).abs()
    labels = labels.long()
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, labels, gap)
    counts = torch.bincount(labels, minlength=num_classes).double().unsqueeze(1)
    out = sums / counts
    out[counts.squeeze(1) == 0] = float("nan")
    return out.numpy()


def describe(values: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Mean, standard deviation (ddof 0), min, median and max of a set of values."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return {
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "median": float(np.median(v)),
        "max": float(v.max()),
    }


def _round(a: np.ndarray, digits: int = 6) -> list:
    return [float(f"{x:.{digits}g}") for x in np.asarray(a, dtype=np.float64).ravel()]


# --------------------------------------------------------------------------------------------------------------------
# per-epoch callback


@CALLBACKS.register("logit_stats")
class LogitStatsCallback(Callback):
    """Per epoch, on a fixed subset of the training split (eval transform, model in eval mode):

    ``logit_sum_mean`` / ``logit_sum_std`` (spread of the per-sample logit sum, kl-vs-mse Fig. 2),
    ``logit_std_mean`` (mean per-sample logit std), ``feature_norm_mean`` (mean ‖r^s‖₂, kl-vs-mse Fig. 4b) and, when a
    teacher is known (the run's, or ``teacher:`` in the config of a CE run), ``logit_dist_mean`` (mean ‖z^s − z^t‖₂,
    kl-vs-mse Fig. 4a) and ``teacher_logit_sum_mean``/``_std``. The teacher's outputs are computed once; each epoch
    costs one student forward over ``max_samples`` samples. ``instr_logit_stats_s`` records that cost.
    """

    max_samples = 1024

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.teacher_logits: torch.Tensor | None = None
        self.teacher_row: dict[str, float] = {}

    def setup(self, trainer: Trainer) -> None:
        from kdlab.instruments.reference import reference_teacher

        reference_teacher(trainer)  # validates a reference teacher named in the config before anything is written

    def on_train_start(self, trainer: Trainer) -> None:
        from kdlab.instruments.outputs import collect_outputs, subset_indices
        from kdlab.instruments.reference import reference_teacher

        idx = subset_indices(trainer.data.num_train, self.max_samples, trainer.cfg.seed)
        self.indices = None if idx is None else idx.to(trainer.device)
        teacher = reference_teacher(trainer)
        if teacher is not None:
            out = collect_outputs(teacher, trainer.data, "train", trainer.cfg.train.eval_batch_size, self.indices)
            self.teacher_logits = out.logits.to(trainer.device)
            sums = self.teacher_logits.sum(dim=1)
            self.teacher_row = {
                "teacher_logit_sum_mean": sums.mean().item(),
                "teacher_logit_sum_std": sums.std(correction=0).item(),
            }

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        model = trainer.student
        was_training = model.training
        model.eval()
        zs, rs = [], []
        with torch.inference_mode():
            for x, _, _ in trainer.data.eval_batches("train", trainer.cfg.train.eval_batch_size, self.indices):
                out = model.forward_features(x)  # type: ignore[operator]
                zs.append(out.logits.float())
                rs.append(torch.flatten(out.pooled, 1).float())
            z, r = torch.cat(zs), torch.cat(rs)
            sums = z.sum(dim=1)
            row: dict[str, Any] = {
                "logit_sum_mean": sums.mean(),
                "logit_sum_std": sums.std(correction=0),
                "logit_std_mean": z.std(dim=1, correction=0).mean(),
                "feature_norm_mean": r.norm(dim=1).mean(),
            }
            if self.teacher_logits is not None:
                row["logit_dist_mean"] = (z - self.teacher_logits).norm(dim=1).mean()
            row = {k: v.item() for k, v in row.items()}
        model.train(was_training)
        row.update(self.teacher_row)
        row["instr_logit_stats_s"] = round(time.perf_counter() - t0, 5)
        return row
