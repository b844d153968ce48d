"""``write_report``: one self-contained HTML page comparing runs.

Every run (finished or still training) gets its learning curves, read from ``metrics.jsonl``: accuracy, the loss
and each of its terms against epoch, and the scalars of the instruments recorded during training. Analysed runs
also get their ``analysis/summary.json`` (written by :func:`~kdlab.instruments.analysis.analyze_run`) and its
figures. The page holds a comparison table, cross-run figures drawn from the summaries' numbers (logit-sum
histograms as in kl-vs-mse Fig. 2, ‖z^s − z^t‖ and ‖r^s‖ pdfs as in Fig. 4, μ over epochs as in
reusing-teacher-classifier Fig. 1) and every run's own figures, all PNGs embedded as base64: no external file.
"""

from __future__ import annotations

import base64
import html
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import read_metrics
from kdlab.errors import KdlabError, check_output_file
from kdlab.fileio import read_bytes, read_json
from kdlab.instruments import plots
from kdlab.instruments.analysis import ANALYSIS_DIR, SUMMARY
from kdlab.instruments.logit_stats import Histogram


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``analysis/summary.json`` (one-line error when the run was not analysed)."""
    path = Path(run_dir) / ANALYSIS_DIR / SUMMARY
    if not path.is_file():
        raise KdlabError(f"{run_dir} has no {ANALYSIS_DIR}/{SUMMARY}: run `kdlab analyze {run_dir}` first")
    summary = read_json(path, "json", "analysis summary")
    if not isinstance(summary, dict):
        raise KdlabError(f"{path} is not an analysis summary; rerun `kdlab analyze {run_dir} --overwrite`")
    return summary


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def comparison_rows(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row of key numbers per run (what the report's table shows)."""
    rows = []
    for s in summaries:
        st = s["logit_stats"]["student"]
        te = s["logit_stats"].get("teacher")
        fig = s["figures"]
        al = s.get("alignment") or {}
        rs = s.get("run_summary") or {}
        p_all = al.get("pearson_mu_loss") or {}
        p_half = al.get("pearson_mu_loss_second_half") or {}
        rows.append({
            "run": s["name"],
            "model": s["model"],
            "method": s.get("method_label", s["method"]),
            "teacher": (s.get("teacher") or {}).get("name"),
            "test acc %": rs.get("final_test_acc"),
            "test top-5 %": rs.get("final_test_top5"),
            f"{s['split']} acc %": s["accuracy"]["student"],
            "logit sum mean": st["sum"]["mean"],
            "logit sum std": st["sum"]["std"],
            "teacher logit sum std": None if te is None else te["sum"]["std"],
            "logit std mean": st["std"]["mean"],
            "‖z^s−z^t‖ mean": (fig.get("logit_distance_pdf") or {}).get("stats", {}).get("mean"),
            "‖r^s‖ mean": fig["feature_norm_pdf"]["student"]["stats"]["mean"],
            "heatmap mean raw": (fig.get("logit_gap_heatmap") or {}).get("raw", {}).get("mean"),
            "heatmap mean std.": (fig.get("logit_gap_heatmap") or {}).get("standardized", {}).get("mean"),
            "μ final": al.get("final_mu"),
            "r(μ, loss)": p_all.get("r"),
            "r(μ, loss) 2nd half": p_half.get("r"),
        })  # fmt: skip
    return rows


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(read_bytes(path, "image", "figure")).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/></figure>'


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hist(d: dict[str, Any]) -> Histogram:
    return Histogram(np.asarray(d["counts"], dtype=float), np.asarray(d["edges"], dtype=float))


def cross_run_figures(summaries: Sequence[dict[str, Any]], tmp: Path) -> list[Path]:
    """PNGs comparing runs (logit-sum histograms, distance and norm pdfs, μ per epoch) written into folder ``tmp``."""
    out: list[Path] = []
    names = [s["name"] for s in summaries]
    title_runs = ", ".join(names) if len(", ".join(names)) < 160 else f"{len(names)} runs"
    # kl-vs-mse Fig. 2 across runs (+ the first teacher)
    series = {s["label"]: _hist(s["figures"]["logit_sum_hist"]["student"]) for s in summaries}
    teach = next((s for s in summaries if "teacher" in s["figures"]["logit_sum_hist"]), None)
    if teach is not None:
        series[f"teacher {teach['teacher']['name']}"] = _hist(teach["figures"]["logit_sum_hist"]["teacher"])
    out.append(plots.plot_histograms(
        series, f"student logit sum Σ_k z_k per sample (kl-vs-mse Fig. 2)\n{title_runs}", "logit sum Σ_k z_k",
        tmp / "cmp_logit_sum.png", density=True,
    ))  # fmt: skip
    dist = {s["label"]: _hist(s["figures"]["logit_distance_pdf"]) for s in summaries if "logit_distance_pdf" in s["figures"]}
    if dist:
        out.append(plots.plot_histograms(
            dist, f"pdf of ‖z^s − z^t‖₂ (kl-vs-mse Fig. 4a)\n{title_runs}", "‖z^s − z^t‖₂",
            tmp / "cmp_logit_distance.png", density=True,
        ))  # fmt: skip
    norms = {s["label"]: _hist(s["figures"]["feature_norm_pdf"]["student"]) for s in summaries}
    out.append(plots.plot_histograms(
        norms, f"pdf of ‖r^s‖₂ (kl-vs-mse Fig. 4b)\n{title_runs}", "‖r^s‖₂", tmp / "cmp_feature_norm.png", density=True,
    ))  # fmt: skip
    with_mu = [s for s in summaries if (s.get("alignment") or {}).get("mu")]
    if with_mu:
        from matplotlib.figure import Figure  # several runs on one axis: epochs may differ

        fig = Figure(figsize=(6.5, 4.4))
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.82)
        ax = fig.add_subplot(1, 1, 1)
        for s in with_mu:
            r = (s["alignment"].get("pearson_mu_loss") or {}).get("r")
            ax.plot(s["alignment"]["epochs"], s["alignment"]["mu"], label=f"{s['label']}  r={_fmt(r, 3)}")
        ax.set_xlabel("epoch")
        plots._integer_epochs(ax)
        ax.set_ylabel("μ = ‖W_t − W_s‖_F")
        ax.set_title(plots._wrap(f"classifier alignment μ per epoch (reusing-teacher-classifier Fig. 1)\n{title_runs}", fig), fontsize=9)
        ax.legend(fontsize=7)
        out.append(plots._save(fig, tmp / "cmp_alignment.png"))
    return out


def metric_runs(run_dirs: Sequence[str | Path]) -> dict[Path, str]:
    """Run folders with a ``metrics.jsonl`` at or below ``run_dirs`` (finished or still training), in order, each
    with its label: the given folder's name, then the path below it."""
    found: dict[Path, str] = {}
    for p in map(Path, run_dirs):
        if not p.exists():
            raise KdlabError(f"no such run or folder: {p}")
        if (p / "metrics.jsonl").is_file():
            found.setdefault(p, p.resolve().name)
        elif p.is_dir():
            for m in sorted(p.rglob("metrics.jsonl")):
                if (m.parent / "config.yaml").is_file():
                    found.setdefault(m.parent, str(Path(p.resolve().name) / m.parent.relative_to(p)))
    return found


def learning_curves_html(runs: dict[Path, str], tmp: Path) -> str:
    """The learning-curves section: per run (folder → label), accuracy and loss terms against epoch and the live
    instruments' scalars (``instruments:`` in its config), all read from ``metrics.jsonl``; no ``kdlab analyze``."""
    parts = [
        "<h2>Learning curves</h2><p>From each run's <code>metrics.jsonl</code> (a run still training shows its "
        "epochs so far): accuracy, the training loss with each of its weighted terms, the test loss, and the "
        "scalars of the instruments recorded during training.</p>"
    ]
    metrics = {run: read_metrics(run) for run in runs}
    overlay = {runs[r]: plots.epoch_series(rows, "test_acc") for r, rows in metrics.items() if rows}
    if 1 < len(overlay) <= 16:
        fig = plots.plot_runs_overlay(overlay, "test accuracy (%)", "test accuracy per epoch, all runs",
                                      tmp / "curves_all.png")  # fmt: skip
        parts.append(f"<div class='grid'>{_img(fig, 'test accuracy per epoch, all runs')}</div>")
    for i, (run, name) in enumerate(runs.items()):
        rows = metrics[run]
        if not rows:
            continue
        last = rows[-1]
        done = "finished" if (run / "summary.json").is_file() else "running or interrupted"
        head = (f"{html.escape(name)}: {len(rows)} epochs ({done}), last test acc "
                f"{_fmt(last.get('test_acc'))} %")  # fmt: skip
        figs = [plots.plot_learning_curves(rows, f"{name}: learning curves", tmp / f"curves_{i}.png")]
        keys = plots.instrument_columns(rows)
        if keys:
            figs.append(plots.plot_instrument_curves(rows, keys, f"{name}: instruments per epoch", tmp / f"live_{i}.png"))
        opened = " open" if len(runs) <= 4 else ""
        imgs = "".join(_img(p, f"{name} {p.stem}") for p in figs)
        parts.append(f"<details{opened}><summary>{head}</summary><div class='grid'>{imgs}</div></details>")
    return "\n".join(parts)


CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;
font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}figure{margin:.5em 0}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{flex:1 1 560px;max-width:700px}"""


def write_report(run_dirs: Sequence[str | Path], out: str | Path, overwrite: bool = False) -> Path:
    """Write the comparison page for ``run_dirs`` to ``out`` (refuses to replace an existing file unless asked)."""
    if not run_dirs:
        raise KdlabError("report needs at least one run directory")
    out = check_output_file(out, overwrite)  # before any run is read
    from kdlab.pipelines.compare import compare_rows, comparison_records

    # runs analysed with `kdlab analyze` get the instrument sections; every run or sweep folder gets a row in the
    # accuracy table, next to the paper's number recorded in its recipe's `meta`
    analysed = [d for d in run_dirs if (Path(d) / ANALYSIS_DIR / SUMMARY).is_file()]
    curves = metric_runs(run_dirs)
    try:
        accuracy = comparison_records(compare_rows(run_dirs))
    except KdlabError:
        if not curves:
            raise
        accuracy = []  # runs still training: their learning curves so far
    if not analysed and not accuracy and not curves:
        raise KdlabError(f"no kdlab runs or analyses found in {', '.join(map(str, run_dirs))}")
    summaries = [load_summary(d) for d in analysed]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>kdlab report</title><style>{CSS}</style></head><body>",
        "<h1>kdlab report</h1>",
        "<h2>Accuracy, ours vs the papers</h2>",
        _table(accuracy) if accuracy else "<p>no finished runs</p>",
        "<p>mean ± std over seeds (n runs); paper: the number recorded in the recipe's <code>meta.paper_top1</code>; "
        "Δ = our best − paper.</p>",
    ]
    if curves:
        with tempfile.TemporaryDirectory() as tmp:
            parts.append(learning_curves_html(curves, Path(tmp)))
    if summaries:
        parts += [
            f"<h2>Instruments</h2><p>{len(summaries)} analysed run(s); numbers measured by <code>kdlab analyze</code> "
            "on each run's split (see each run's <code>analysis/summary.json</code>).</p>",
            _table(comparison_rows(summaries)),
            "<p>r(μ, loss): Pearson correlation between classifier alignment μ and the training loss over epochs "
            "(all epochs; 2nd half: after the first half of training, the paper's protocol).</p>",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            figs = cross_run_figures(summaries, Path(tmp))
            parts.append("<div class='grid'>" + "".join(_img(p, p.stem) for p in figs) + "</div>")
    for d, s in zip(analysed, summaries):
        parts.append(f"<h2>{html.escape(s['label'])}</h2>")
        parts.append(f"<p>run <code>{html.escape(str(d))}</code>, {s['num_samples']} {s['split']} samples")
        if s.get("teacher"):
            parts.append(f", teacher {html.escape(s['teacher']['name'])}")
        parts.append("</p>")
        if s.get("skipped"):
            items = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in s["skipped"].items())
            parts.append(f"<details><summary>not measured</summary><ul>{items}</ul></details>")
        stats_rows = [
            {"model": who, **{f"{stat} (mean ± std)": f"{v['mean']:.4g} ± {v['std']:.3g}" for stat, v in st.items()}}
            for who, st in s["logit_stats"].items()
        ]
        parts.append(_table(stats_rows))
        th = s.get("theory")
        if th:
            eq = th["equal_mean"]
            parts.append(_table([{
                "zero-mean gradient (worst rel. row sum)": th["zero_mean_gradient"]["kd_worst"],
                "T→∞ rel. error at T max": th["tau_infinity"]["rel_error"][-1],
                "T→∞ log-log slope": th["tau_infinity"]["loglog_slope_T_ge_16"],
                "T→0 error at T min": th["tau_zero"]["mean_abs_error"][0],
                "student logit mean": eq["student_logit_mean"],
                "teacher logit mean": eq["teacher_logit_mean"],
                "KD vs LM rel. diff": eq["kd_vs_lm_rel_diff"],
                "… predicted by mean gap": eq["predicted_by_mean_gap"],
                "… with equal means": eq["kd_vs_lm_rel_diff_equal_mean"],
            }]))  # fmt: skip
        init = s.get("init_logit_mean")
        if init:
            parts.append(_table([
                {"model": f"{who}: {v['model']}", "seeds": v["seeds"], "mean logit at init": v["mean"],
                 "std over seeds": v["std"], "mean |·|": v["mean_abs"]}
                for who, v in init.items()
            ]))  # fmt: skip
        base = Path(d) / ANALYSIS_DIR
        names = [f.get("file") for f in s["figures"].values() if isinstance(f, dict)]
        # a figure is a file of the analysis folder itself: a name with a path in it is not read into the page
        imgs = [base / n for n in names if isinstance(n, str) and Path(n).name == n and (base / n).is_file()]
        parts.append("<div class='grid'>" + "".join(_img(p, f"{s['name']} {p.stem}") for p in imgs) + "</div>")
    parts.append("</body></html>")
    atomic_write_text(out, "\n".join(parts), output=True)
    return out
