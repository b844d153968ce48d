"""Every instrument on the outputs of one run: the figures (PNG) and the numbers behind them.

:func:`measure` is what ``kdlab analyze`` computes once :func:`~kdlab.instruments.analysis.analyze_run` has loaded the
run, its teacher and their outputs on a split; it writes the figures into a folder and returns the summary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlab.engine.rundir import read_metrics
from kdlab.errors import KdlabError
from kdlab.fileio import read_json
from kdlab.instruments import plots
from kdlab.instruments.alignment import (
    alignment_loss_correlation,
    check_same_shape,
    classifier_alignment,
)
from kdlab.instruments.distances import feature_norm, logit_distance, pdf
from kdlab.instruments.geometry import project_classes, tsne
from kdlab.instruments.init_stats import init_logit_mean
from kdlab.instruments.logit_stats import (
    STAT_NAMES,
    class_gap_heatmap,
    describe,
    histogram,
    histogram2d,
    logit_stats,
)
from kdlab.instruments.outputs import Outputs, subset_indices
from kdlab.instruments.subjects import TeacherChoice, method_label
from kdlab.instruments.theory import theory_checks

FORMAT = "kdlab-analysis-v1"


def json_safe(obj: Any) -> Any:
    """JSON-safe copy: numpy → lists/floats, NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    return obj


def _rounded(a: np.ndarray, digits: int = 5) -> list:
    return [[float(f"{x:.{digits}g}") for x in row] for row in np.asarray(a, dtype=np.float64)]


def measure(
    run_dir: Path,
    cfg: Any,
    label: str,
    split: str,
    s: Outputs,
    t: Outputs | None,
    t_spec: TeacherChoice | None,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    out: Path,
    k: int,
    *,
    classes: Sequence[int] | None,
    tsne_samples: int,
    init_seeds: int,
    bins: int,
    inputs: torch.Tensor,
    device: torch.device,
    log: Callable[[str], None],
) -> dict[str, Any]:
    n = len(s)
    figures: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    run_summary = None
    if os.path.lexists(run_dir / "summary.json"):  # bounded; a damaged one is a one-line error naming it
        run_summary = read_json(run_dir / "summary.json", "json", "run summary")

    def acc(o: Outputs) -> float:
        return 100.0 * float((o.logits.argmax(1) == o.labels).double().mean())

    summary: dict[str, Any] = {
        "format": FORMAT,
        "run": str(run_dir),
        "name": run_dir.name,
        "label": label,
        "model": cfg.model.name,
        "method": cfg.method.name,
        "method_params": cfg.method.params(),
        "method_label": method_label(cfg),
        "teacher": None if t_spec is None else {"name": t_spec.name, "weights": t_spec.weights},
        "dataset": cfg.data.name,
        "split": split,
        "num_samples": n,
        "num_classes": k,
        "accuracy": {"student": acc(s), "teacher": None if t is None else acc(t)},
        "run_summary": run_summary,
    }
    who = {"student": s} if t is None else {"student": s, "teacher": t}
    stats = {w: logit_stats(o.logits) for w, o in who.items()}
    fwho = {w: o for w, o in who.items() if o.features is not None}  # models with a penultimate feature
    if t is not None and t.features is None:
        skipped["teacher_features"] = "the teacher has no penultimate feature (ensemble): student-only feature figures"
    summary["logit_stats"] = {w: {name: describe(v[name]) for name in STAT_NAMES} for w, v in stats.items()}

    # kl-vs-mse Fig. 2: logit sum histograms
    hists = {w: histogram(v["sum"], bins) for w, v in stats.items()}
    plots.plot_histograms(
        {f"{w} ({cfg.model.name if w == 'student' else t_spec.name})": h for w, h in hists.items()},  # type: ignore[union-attr]
        f"{label}\nper-sample logit sum Σ_k z_k on {split} (kl-vs-mse Fig. 2)", "logit sum Σ_k z_k",
        out / "logit_sum_hist.png",
    )  # fmt: skip
    figures["logit_sum_hist"] = {"file": "logit_sum_hist.png", **{w: h.to_json() for w, h in hists.items()}}

    # logit-standardization Fig. 5: mean × std bivariate histogram, shared ranges
    all_mean = torch.cat([v["mean"] for v in stats.values()])
    all_std = torch.cat([v["std"] for v in stats.values()])
    xr = (float(all_mean.min()), float(all_mean.max()))
    yr = (float(all_std.min()), float(all_std.max()))
    xr = xr if xr[0] < xr[1] else (xr[0] - 0.5, xr[1] + 0.5)
    yr = yr if yr[0] < yr[1] else (yr[0] - 0.5, yr[1] + 0.5)
    h2 = {w: histogram2d(v["mean"], v["std"], 40, xr, yr) for w, v in stats.items()}
    plots.plot_hist2d(
        h2, f"{label}\nlogit mean × logit std per sample (logit-standardization Fig. 5)",
        "logit mean", "logit standard deviation", out / "logit_mean_std_hist2d.png",
    )  # fmt: skip
    figures["logit_mean_std_hist2d"] = {"file": "logit_mean_std_hist2d.png", **{w: h.to_json() for w, h in h2.items()}}

    if t is not None:
        # logit-standardization Fig. 3: per-class average |z^t − z^s|
        raw = class_gap_heatmap(t.logits, s.logits, s.labels, k)
        std = class_gap_heatmap(t.logits, s.logits, s.labels, k, standardized=True)
        plots.plot_heatmaps(
            {"raw logits": raw, "Z-score standardized logits": std},
            f"{label}\naverage |z^t − z^s| per true class (logit-standardization Fig. 3)", out / "logit_gap_heatmap.png",
        )  # fmt: skip
        figures["logit_gap_heatmap"] = {
            "file": "logit_gap_heatmap.png",
            "raw": {"mean": float(np.nanmean(raw)), "max": float(np.nanmax(raw)), "matrix": _rounded(raw)},
            "standardized": {"mean": float(np.nanmean(std)), "max": float(np.nanmax(std)), "matrix": _rounded(std)},
        }
        # kl-vs-mse Fig. 4a
        dist = logit_distance(s.logits, t.logits)
        h = pdf(dist, bins)
        plots.plot_histograms(
            {"student vs teacher": h}, f"{label}\npdf of ‖z^s − z^t‖₂ on {split} (kl-vs-mse Fig. 4a)",
            "‖z^s − z^t‖₂", out / "logit_distance_pdf.png", density=True,
        )  # fmt: skip
        figures["logit_distance_pdf"] = {"file": "logit_distance_pdf.png", "stats": describe(dist), **h.to_json()}
    else:
        for name in ("logit_gap_heatmap", "logit_distance_pdf", "theory"):
            skipped[name] = "no teacher (pass --teacher RUN_OR_CHECKPOINT)"

    # kl-vs-mse Fig. 4b
    norms = {w: feature_norm(o.features) for w, o in fwho.items()}  # type: ignore[arg-type]
    nh = {w: pdf(v, bins) for w, v in norms.items()}
    plots.plot_histograms(
        {f"‖r^{w[0]}‖₂ ({w})": h for w, h in nh.items()},
        f"{label}\npdf of the penultimate-feature norm on {split} (kl-vs-mse Fig. 4b)", "‖r‖₂",
        out / "feature_norm_pdf.png", density=True,
    )  # fmt: skip
    figures["feature_norm_pdf"] = {
        "file": "feature_norm_pdf.png", **{w: {"stats": describe(norms[w]), **h.to_json()} for w, h in nh.items()}
    }

    # kl-vs-mse Fig. 5: template projection
    present = sorted(int(c) for c in torch.unique(s.labels))
    chosen = [int(c) for c in classes] if classes is not None else present[:3]
    projs = None
    if len(chosen) == 3:
        try:
            projs = {w: project_classes(o.features, o.labels, chosen) for w, o in fwho.items()}  # type: ignore[arg-type]
        except KdlabError as err:
            if classes is not None:
                raise
            skipped["template_projection"] = str(err)
    else:
        skipped["template_projection"] = f"needs 3 classes, the split has {len(present)}"
    if projs is not None:
        plots.plot_scatter_panels(
            {w: (p.coords, p.labels) for w, p in projs.items()},
            f"{label}\npenultimate features of classes {chosen} on the plane of their templates (kl-vs-mse Fig. 5)",
            out / "template_projection.png", "template-plane coordinate 1", "template-plane coordinate 2",
            markers={w: p.template_coords for w, p in projs.items()},
        )  # fmt: skip
        figures["template_projection"] = {
            "file": "template_projection.png", "classes": chosen,
            **{w: {"coords": _rounded(p.coords), "labels": p.labels.tolist(), "templates": _rounded(p.template_coords)}
               for w, p in projs.items()},
        }  # fmt: skip

    # t-SNE of penultimate features
    emb: dict[str, np.ndarray] = {}
    if tsne_samples > 0:
        sub = subset_indices(n, tsne_samples, cfg.seed)
        sel = torch.arange(n) if sub is None else sub
        log(f"t-SNE of {len(sel)} samples")
        for w, o in fwho.items():
            try:
                emb[w] = tsne(o.features[sel], seed=cfg.seed)  # type: ignore[index]
            except KdlabError as err:
                skipped[f"tsne_{w}"] = str(err)
        lab = s.labels[sel].numpy()
        if emb:
            plots.plot_scatter_panels(
                {w: (e, lab) for w, e in emb.items()},
                f"{label}\nt-SNE of penultimate features ({len(sel)} {split} samples)",
                out / "tsne.png", "t-SNE 1", "t-SNE 2",
            )  # fmt: skip
            figures["tsne"] = {
                "file": "tsne.png", "labels": lab.tolist(), **{w: {"coords": _rounded(e)} for w, e in emb.items()}
            }
    else:
        skipped["tsne"] = "disabled (tsne_samples = 0)"

    # per-epoch instruments recorded during training
    rows = read_metrics(run_dir)
    summary["alignment"] = _alignment(rows, student, teacher, label, out, figures, skipped)
    _epoch_logit_stats(rows, label, out, figures, skipped)

    # theory checks on this run's logits
    if t is not None:
        sub = subset_indices(n, 2048, cfg.seed)
        sel = torch.arange(n) if sub is None else sub
        th = theory_checks(s.logits[sel], t.logits[sel], s.labels[sel])
        plots.plot_theory(th, f"{label}\nKD gradient limits on this run's logits", out / "theory_limits.png")
        figures["theory_limits"] = {"file": "theory_limits.png"}
        summary["theory"] = th

    # logit mean at initialisation (kd-vs-logit-matching Table 1)
    if init_seeds > 0:
        log(f"logit mean at initialisation over {init_seeds} seeds")
        init = {"student": init_logit_mean(cfg.model, k, inputs, range(init_seeds), device=device).to_json()}
        if t_spec is not None and t_spec.spec is not None:
            init["teacher"] = init_logit_mean(t_spec.spec, k, inputs, range(init_seeds), device=device).to_json()
        summary["init_logit_mean"] = init
    else:
        skipped["init_logit_mean"] = "disabled (init_seeds = 0)"

    summary["figures"] = figures
    summary["skipped"] = skipped
    return summary


def _alignment(
    rows: list[dict[str, Any]],
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    label: str,
    out: Path,
    figures: dict[str, Any],
    skipped: dict[str, str],
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    w_t = getattr(getattr(teacher, "classifier", None), "weight", None)
    w_s = getattr(getattr(student, "classifier", None), "weight", None)
    if teacher is not None and (w_t is None or w_s is None):
        result["error"] = "the teacher or the student exposes no final linear classifier (ensemble teacher?)"
    elif teacher is not None:
        try:
            check_same_shape(w_t, w_s)
            a = classifier_alignment(w_t, w_s)
            result.update(final_mu=a.mu, final_cos=a.cosine)
        except KdlabError as err:
            result["error"] = str(err)
    rec = [r for r in rows if r.get("align_mu") is not None]
    if len(rec) >= 3:
        last = max(int(r["epoch"]) for r in rows)
        half = last // 2
        epochs = [int(r["epoch"]) for r in rec]
        mu = [float(r["align_mu"]) for r in rec]
        loss = [float(r["train_loss"]) for r in rec]
        c_all = alignment_loss_correlation(rows)
        c_half = alignment_loss_correlation(rows, skip_epochs=half)
        result.update(
            epochs=epochs, mu=mu, cos=[r.get("align_cos") for r in rec], train_loss=loss,
            pearson_mu_loss=None if c_all is None else c_all.to_json(),
            pearson_mu_loss_second_half=None if c_half is None else dict(c_half.to_json(), after_epoch=half),
        )  # fmt: skip
        r_text = "" if c_all is None else f"\nPearson r(μ, loss) = {c_all.r:.3f}"
        if c_half is not None:
            r_text += f" (epochs > {half}: {c_half.r:.3f})"
        plots.plot_epoch_curves(
            epochs, {"μ = ‖W_t − W_s‖_F": mu}, "μ = ‖W_t − W_s‖_F",
            f"{label}\nclassifier alignment over training{r_text}", out / "alignment.png",
            right={"training loss": loss}, right_label="training loss",
        )  # fmt: skip
        figures["alignment"] = {"file": "alignment.png"}
    else:
        why = "not recorded during training (enable `instruments: [alignment]`)"
        skipped["alignment"] = result.get("error", why) if "error" in result else why
    return result


def _epoch_logit_stats(
    rows: list[dict[str, Any]], label: str, out: Path, figures: dict[str, Any], skipped: dict[str, str]
) -> None:
    rec = [r for r in rows if r.get("logit_sum_mean") is not None]
    if not rec:
        skipped["epoch_logit_stats"] = "not recorded during training (enable `instruments: [logit_stats]`)"
        return
    epochs = [int(r["epoch"]) for r in rec]
    keys = ("logit_sum_mean", "logit_sum_std", "logit_std_mean", "feature_norm_mean", "logit_dist_mean")
    series = {key: [r.get(key) for r in rec] for key in keys if all(r.get(key) is not None for r in rec)}
    left = {kk: v for kk, v in series.items() if kk in ("logit_sum_mean", "logit_sum_std")}
    right = {kk: v for kk, v in series.items() if kk in ("logit_dist_mean", "feature_norm_mean")}
    plots.plot_epoch_curves(
        epochs, left, "student logit sum (mean / std over samples)",
        f"{label}\nlogit statistics per epoch (training subset)", out / "epoch_logit_stats.png",
        right=right or None, right_label="‖z^s − z^t‖₂ mean, ‖r^s‖₂ mean",
    )  # fmt: skip
    figures["epoch_logit_stats"] = {"file": "epoch_logit_stats.png", "epochs": epochs, **series}
