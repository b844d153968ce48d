"""`kdlab report`: learning curves and live instruments from metrics.jsonl; the plot fixes of issue 15."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS, SMALL


def _images(page: str) -> dict[str, bytes]:
    return {alt: base64.b64decode(data) for alt, data in re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]*)"', page)}


@pytest.mark.usefixtures("one_thread")
def test_report_has_learning_curves_and_live_instruments(teacher_run: Path, tmp_path: Path) -> None:
    from kdlab.cli import main
    from kdlab.config import load_config
    from kdlab.engine import run

    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml",
                      SMALL + [f"teacher.checkpoint={teacher_run}", "instruments=[logit_stats]"])  # fmt: skip
    run(cfg, tmp_path / "runs" / "kd")
    live = tmp_path / "runs" / "live"  # a run still training: config and two epochs of metrics, no summary.json
    live.mkdir()
    (live / "config.yaml").write_text((tmp_path / "runs" / "kd" / "config.yaml").read_text())
    rows = (tmp_path / "runs" / "kd" / "metrics.jsonl").read_text().splitlines()
    (live / "metrics.jsonl").write_text("\n".join(rows[:2]) + '\n{"epoch": 3, "tra')  # torn last line

    out = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "runs"), str(teacher_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<h2>Learning curves</h2>" in page
    assert "runs/kd: 2 epochs (finished)" in page and "runs/live: 2 epochs (running or interrupted)" in page
    imgs = _images(page)
    assert {"runs/kd curves_0", "runs/kd live_0", "runs/live curves_1", "runs/live live_1"} <= set(imgs)  # no `kdlab analyze` needed
    assert "test accuracy per epoch, all runs" in imgs  # the runs side by side
    assert all(b[:8] == b"\x89PNG\r\n\x1a\n" for b in imgs.values())

    only_live = tmp_path / "live.html"  # a report of a run that has not finished yet
    assert main(["report", str(live), "--out", str(only_live)]) == 0
    assert "live curves_0" in _images(only_live.read_text())


def test_curve_columns() -> None:
    from kdlab.instruments.plots import instrument_columns, loss_columns

    rows = [{"epoch": 1, "train_ce": 0.1, "train_kd": 0.2, "train_loss": 0.3, "train_acc": 50.0, "test_acc": 40.0,
             "test_loss": 1.0, "test_top5": 90.0, "lr": 0.1, "epoch_time_s": 1.0, "images_per_s": 9.0,
             "logit_sum_mean": 0.5, "teacher_logit_sum_mean": 1.0, "align_mu": 3.0, "instr_logit_stats_s": 0.1}]  # fmt: skip
    assert loss_columns(rows) == ["train_loss", "train_ce", "train_kd", "test_loss"]
    assert instrument_columns(rows) == ["logit_sum_mean", "teacher_logit_sum_mean", "align_mu"]


def test_theory_plot_axis_spans_measured_decades(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    from kdlab.instruments import plots

    captured: list[Figure] = []
    real = plots._save
    temps = [1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3, 1e4]
    theory = {"temperatures": temps, "tau_zero": {"mean_abs_error": [0.0, 1e-314, 1e-9, 0.05, 0.1, 0.18, 0.18]},
              "tau_infinity": {"rel_error": [1.0, 0.99, 0.9, 0.7, 0.2, 3e-3, 3e-4], "loglog_slope_T_ge_16": -1.0}}  # fmt: skip
    plots._save = lambda fig, path: captured.append(fig) or real(fig, path)  # type: ignore[assignment]
    try:
        plots.plot_theory(theory, "theory", tmp_path / "theory.png")
    finally:
        plots._save = real  # type: ignore[assignment]
    inf_ax, zero_ax = captured[0].axes[:2]
    lo, hi = zero_ax.get_ylim()
    assert lo >= plots.FLOAT_FLOOR / 10 and hi <= 1.0  # was 1e-314 … 1e6
    assert inf_ax.get_ylim()[0] >= 1e-5
    floor = [line for line in zero_ax.get_lines() if line.get_marker() == "v"]
    assert len(floor) == 1 and len(floor[0].get_xdata()) == 2  # the exact zero and the denormal, marked on the floor


def test_scatter_legend_outside_every_panel(tmp_path: Path) -> None:
    from kdlab.instruments import plots

    captured = []
    real = plots._save
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 10, 300)
    panels = {w: (rng.normal(size=(300, 2)), lab) for w in ("student", "teacher")}
    plots._save = lambda fig, path: captured.append(fig) or real(fig, path)  # type: ignore[assignment]
    try:
        plots.plot_scatter_panels(panels, "t-SNE", tmp_path / "tsne.png", "t-SNE 1", "t-SNE 2")
    finally:
        plots._save = real  # type: ignore[assignment]
    fig = captured[0]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1 and len(legends[0].get_texts()) == 10  # one legend for both panels
    renderer = fig.canvas.get_renderer()
    box = legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer))
    assert box.x1 <= fig.bbox.x1 + 1  # and it fits in the figure


def test_demo_bar_chart_starts_at_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from kdlab.demo import bar_chart

    figs = []
    real = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig) or real(fig))
    bar_chart({"CE": [62.0, 63.0], "KD": [70.0, 71.0]}, 98.2, tmp_path / "bar.png")
    ax = figs[0].axes[0]
    assert ax.get_ylim()[0] == 0
    assert {t.get_text() for t in ax.texts} == {"62.5", "70.5"}  # values printed on the bars
    assert (tmp_path / "bar.png").stat().st_size > 0


def test_report_of_missing_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kdlab.cli import main

    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "r.html")]) == 2
    assert "no such run or folder" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_study_line_plot_title_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/studies/logit_std_table4_lines.png had its long title cut at both edges (pipelines.tables.lines)."""
    from matplotlib.figure import Figure

    from kdlab.pipelines import tables

    figs: list[Figure] = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or real(self, *a, **k))
    cells = [tables.CellResult("student", (("logits", lab), ("method.kd_weight", str(w))), 2,
                               [{"final_test_acc": 60.0 + w + i} for i in range(2)])
             for lab in ("z (KD)", "(z-mean)/std") for w in (0.9, 3.0, 9.0)]  # fmt: skip
    title = ("logit-standardization Table 4 analogue (MNIST-1D): standardization x KD weight: student: "
             "test accuracy vs method.kd_weight")  # fmt: skip
    tables.lines(cells, "method.kd_weight", "logits", tmp_path / "lines.png", title)
    fig = figs[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)  # constrained layout places the title as in the saved file
    box = fig.axes[0].title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1
