"""Instruments: the papers' measurements and figures, live during training and after it.

One module per measurement, each usable from Python:

* :mod:`~kdlab.instruments.logit_stats` — per-sample logit mean/sum/std/max/range, logit-sum histogram (kl-vs-mse
  Fig. 2), mean × std bivariate histogram (logit-standardization Fig. 5), per-class |z^t − z^s| heatmap, raw and
  Z-scored (logit-standardization Fig. 3); callback ``logit_stats``.
* :mod:`~kdlab.instruments.distances` — pdfs of ‖z^s − z^t‖₂ and ‖r^s‖₂ (kl-vs-mse Fig. 4).
* :mod:`~kdlab.instruments.geometry` — projection onto the plane of three class templates (kl-vs-mse Fig. 5, after
  Müller et al.) and t-SNE of penultimate features.
* :mod:`~kdlab.instruments.alignment` — classifier alignment μ = ‖W_t − W_s‖_F, cosine, Pearson r with the training
  loss (reusing-teacher-classifier); callback ``alignment``.
* :mod:`~kdlab.instruments.init_stats` — logit mean at initialisation over seeds (kd-vs-logit-matching Table 1).
* :mod:`~kdlab.instruments.theory` — zero-mean gradient, τ-limits and equal-mean equivalence on real logits.

:func:`~kdlab.instruments.analysis.analyze_run` (``kdlab analyze``) runs all of them on a finished run and
:func:`~kdlab.instruments.report.write_report` (``kdlab report``) compares runs in one HTML page. Importing this package
registers the per-epoch callbacks (``instruments: [alignment, logit_stats]`` in a config).
"""

from kdlab.instruments.alignment import AlignmentCallback, classifier_alignment, pearson
from kdlab.instruments.distances import feature_norm, logit_distance, pdf
from kdlab.instruments.geometry import class_templates, project_classes, template_plane, tsne
from kdlab.instruments.init_stats import init_logit_mean
from kdlab.instruments.logit_stats import (
    LogitStatsCallback,
    class_gap_heatmap,
    histogram,
    histogram2d,
    logit_stats,
    standardize,
)
from kdlab.instruments.outputs import Outputs, collect_outputs
from kdlab.instruments.theory import theory_checks

__all__ = [
    "AlignmentCallback",
    "LogitStatsCallback",
    "Outputs",
    "class_gap_heatmap",
    "class_templates",
    "classifier_alignment",
    "collect_outputs",
    "feature_norm",
    "histogram",
    "histogram2d",
    "init_logit_mean",
    "logit_distance",
    "logit_stats",
    "pdf",
    "pearson",
    "project_classes",
    "standardize",
    "template_plane",
    "theory_checks",
    "tsne",
]
