"""PNG figures of the instruments (matplotlib's object API on the Agg canvas: no global backend state, no display).

Every function takes the numbers already measured (the same ones written to ``analysis/summary.json``), a title that
names the run, and the output path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.instruments.logit_stats import Histogram, Histogram2D

DPI = 100
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray")


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.0, right: float = 0.3) -> tuple[Any, list[Any]]:
    """A figure of ``ncols`` panels with fixed margins in inches (no layout engine: it doubles the drawing time)."""
    from matplotlib.figure import Figure

    w = width * ncols
    fig = Figure(figsize=(w, height))
    fig.subplots_adjust(left=0.85 / w, right=1 - right / w, bottom=0.55 / height, top=1 - 0.8 / height, wspace=0.5)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def wrap_title(title: str, fig: Any, fontsize: float = 10) -> str:
    """Wrap each line of a title to the figure's width (titles name runs and can be long)."""
    import textwrap

    chars = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.62)))  # DejaVu Sans: ~0.6 em per character
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


_wrap = wrap_title


def _save(fig: Any, path: str | Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    # leave room above the axes for the (wrapped) titles: suptitle lines + the tallest axes title
    sup = fig.get_suptitle().count("\n") + 1 if fig.get_suptitle() else 0
    axt = max((ax.get_title().count("\n") + 1 for ax in fig.axes if ax.get_title()), default=0)
    fig.subplots_adjust(top=1 - (0.25 + 0.19 * (sup + axt)) / fig.get_figheight())
    path = Path(path)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_histograms(
    series: Mapping[str, Histogram], title: str, xlabel: str, path: str | Path, density: bool = False
) -> Path:
    """Overlaid step histograms (counts, or densities when ``density``)."""
    fig, (ax,) = _figure()
    for (label, h), color in zip(series.items(), COLORS * 4):
        y = h.density() if density else h.counts
        ax.stairs(y, h.edges, label=label, color=color, fill=False, linewidth=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability density" if density else "number of samples")
    ax.set_title(_wrap(title, fig), fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_hist2d(panels: Mapping[str, Histogram2D], title: str, xlabel: str, ylabel: str, path: str | Path) -> Path:
    """One bivariate histogram per panel, on shared axes limits (logit-standardization Fig. 5)."""
    fig, axes = _figure(len(panels), width=4.6)
    for ax, (label, h) in zip(axes, panels.items()):
        masked = np.ma.masked_equal(h.counts.T, 0)
        mesh = ax.pcolormesh(h.x_edges, h.y_edges, masked, cmap="viridis")
        fig.colorbar(mesh, ax=ax, label="number of samples")
        ax.locator_params(axis="x", nbins=5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=9)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def plot_heatmaps(panels: Mapping[str, np.ndarray], title: str, path: str | Path) -> Path:
    """K×K heatmaps of the average |z^t − z^s| per true class (rows) and logit index (columns)."""
    fig, axes = _figure(len(panels), width=4.8, height=4.2)
    for ax, (label, m) in zip(axes, panels.items()):
        im = ax.imshow(m, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(im, ax=ax, label="mean |z^t − z^s|")
        ax.set_xlabel("logit index k")
        ax.set_ylabel("true class c")
        ax.set_title(f"{label}\nmean {np.nanmean(m):.3g}, max {np.nanmax(m):.3g}", fontsize=9)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def plot_scatter_panels(
    panels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    path: str | Path,
    xlabel: str,
    ylabel: str,
    markers: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Scatter plots coloured by class label, one panel per model (template projection, t-SNE); one legend for
    all panels, to the right of the last one, so that it never covers points."""
    n_classes = max(len(np.unique(labels)) for _, labels in panels.values())
    legend = n_classes <= 12
    fig, axes = _figure(len(panels), width=4.6, height=4.2, right=1.45 if legend else 0.3)
    for ax, (label, (coords, labels)) in zip(axes, panels.items()):
        classes = np.unique(labels)
        cmap = _class_colors(len(classes))
        for i, c in enumerate(classes):
            sel = labels == c
            ax.scatter(coords[sel, 0], coords[sel, 1], s=6, alpha=0.6, color=cmap[i], label=f"class {int(c)}")
        if markers is not None and label in markers:
            m = markers[label]
            ax.scatter(m[:, 0], m[:, 1], marker="X", s=50, color="black", label="class templates")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(label, fontsize=9)
    if legend:
        entries: dict[str, Any] = {}
        for ax in axes:
            for handle, name in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(name, handle)
        axes[-1].legend(entries.values(), entries.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.03, 1.0),
                        borderaxespad=0.0, markerscale=1.5)  # fmt: skip
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def _class_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(i / max(n - 1, 1)) if n > 20 else cmap(i) for i in range(n)]


def plot_epoch_curves(
    epochs: Sequence[int],
    left: Mapping[str, Sequence[float]],
    left_label: str,
    title: str,
    path: str | Path,
    right: Mapping[str, Sequence[float]] | None = None,
    right_label: str = "",
) -> Path:
    """Per-epoch curves, optionally with a second y axis (e.g. μ on the left, training loss on the right)."""
    fig, (ax,) = _figure(width=6.5, right=0.9 if right else 0.3)
    handles = []
    colors = iter(COLORS * 4)
    for label, ys in left.items():
        handles += ax.plot(epochs, ys, color=next(colors), label=label)
    ax.set_xlabel("epoch")
    _integer_epochs(ax)
    ax.set_ylabel(left_label)
    if right:
        ax2 = ax.twinx()
        for label, ys in right.items():
            handles += ax2.plot(epochs, ys, color=next(colors), linestyle="--", label=label)
        ax2.set_ylabel(right_label)
    ax.legend(handles=handles, fontsize=8)
    ax.set_title(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


FLOAT_FLOOR = 1e-15
"""Errors below this are zero to float64 precision: drawn on the floor of the axis, not at their (denormal) value."""


def _loglog_floored(ax: Any, x: np.ndarray, y: np.ndarray, color: str) -> None:
    """Log-log line of ``y`` whose zero / sub-precision values sit as open markers on a floor at FLOAT_FLOOR, so the
    axis spans the measured decades and not down to 1e-300."""
    finite = np.isfinite(y)
    above = finite & (y > FLOAT_FLOOR)
    ax.loglog(x, np.where(above, y, np.nan), "o-", color=color)
    low = finite & ~above
    top = float(np.max(y[above])) if above.any() else 1.0
    bottom = float(np.min(y[above])) if above.any() else FLOAT_FLOOR
    if low.any():
        bottom = FLOAT_FLOOR
        ax.plot(x[low], np.full(int(low.sum()), FLOAT_FLOOR), "v", mfc="none", color=color,
                label=f"≤ {FLOAT_FLOOR:.0e} (0 to float64 precision)")  # fmt: skip
        ax.legend(fontsize=7, loc="best")
    ax.set_ylim(bottom / 3, top * 3)


def plot_theory(theory: Mapping[str, Any], title: str, path: str | Path) -> Path:
    """Relative error of the τ → ∞ limit and mean error of the τ → 0 limit against the temperature (log-log)."""
    fig, axes = _figure(2, width=4.8)
    temps = np.asarray(theory["temperatures"])
    inf_err = np.asarray([np.nan if v is None else v for v in theory["tau_infinity"]["rel_error"]], dtype=float)
    zero_err = np.asarray([np.nan if v is None else v for v in theory["tau_zero"]["mean_abs_error"]], dtype=float)
    _loglog_floored(axes[0], temps, inf_err, "tab:blue")
    axes[0].set_xlabel("temperature T")
    axes[0].set_ylabel("‖∇KD_T − ∇KD_∞‖ / ‖∇KD_∞‖")
    slope = theory["tau_infinity"].get("loglog_slope_T_ge_16")
    axes[0].set_title("T → ∞ (kl-vs-mse Eq. 5)" + (f", slope {slope:.2f}" if slope is not None else ""), fontsize=9)
    _loglog_floored(axes[1], temps, zero_err, "tab:orange")
    axes[1].set_xlabel("temperature T")
    axes[1].set_ylabel("mean |(1/T)∇KD_T − Δ1[argmax]|")
    axes[1].set_title("T → 0 (kl-vs-mse Eq. 6)", fontsize=9)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


#: metrics.jsonl columns that are not instrument scalars (the loop's own numbers and timings)
_LOOP_KEYS = ("epoch", "lr", "epoch_time_s", "images_per_s")


def loss_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``train_loss``, every ``train_<term>`` and ``test_loss`` present in a run's metrics rows."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    terms = [k for k in keys if k.startswith("train_") and k not in ("train_loss", "train_acc")]
    return [k for k in ("train_loss", *terms, "test_loss") if k in keys]


def instrument_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Scalars recorded per epoch by ``instruments:`` (logit statistics, alignment μ, ...): every numeric column
    that is not the loop's own (accuracy, losses, lr, timings) nor an instrument's timing (``instr_*_s``)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [
        k for k in keys
        if k not in _LOOP_KEYS and not k.startswith(("train_", "test_", "instr_"))
        and any(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows)
    ]  # fmt: skip


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, also for a 1-epoch run


def epoch_series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of one metrics.jsonl column, over the rows that hold a number for it."""
    pts = [(float(r["epoch"]), float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_learning_curves(rows: Sequence[Mapping[str, Any]], title: str, path: str | Path) -> Path:
    """A run's learning curves from its metrics.jsonl rows: train / test accuracy (and top-5) against epoch, and the
    training loss with each of its terms and the test loss (log scale when they span more than two decades)."""
    fig, (acc, loss) = _figure(2, width=4.8)
    for key, style in (("train_acc", "-"), ("test_acc", "-"), ("test_top5", ":")):
        x, y = epoch_series(rows, key)
        if x:
            acc.plot(x, y, style, marker="o" if len(x) < 30 else None, ms=3, label=key.replace("_", " "))
    acc.set_xlabel("epoch")
    _integer_epochs(acc)
    _integer_epochs(loss)
    acc.set_ylabel("accuracy (%)")
    acc.set_title("accuracy", fontsize=9)
    acc.legend(fontsize=7)
    values: list[float] = []
    for key, color in zip(loss_columns(rows), COLORS * 4):
        x, y = epoch_series(rows, key)
        if x:
            style = "--" if key == "test_loss" else "-" if key == "train_loss" else ":"
            loss.plot(x, y, style, color=color, marker="o" if len(x) < 30 else None, ms=3, label=key)
            values += y
    positive = [v for v in values if v > 0 and np.isfinite(v)]
    if positive and len(positive) == len(values) and max(positive) / min(positive) > 100:
        loss.set_yscale("log")
    loss.set_xlabel("epoch")
    loss.set_ylabel("loss (weighted terms)")
    loss.set_title("training loss, its terms, and test loss", fontsize=9)
    loss.legend(fontsize=7)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def plot_instrument_curves(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], title: str, path: str | Path) -> Path:
    """One small panel per instrument scalar recorded in metrics.jsonl, against epoch (2 panels per row); the
    teacher's value of a statistic (``teacher_<key>``) is drawn as a dashed line on the student's panel."""
    from matplotlib.figure import Figure

    teacher = {k: f"teacher_{k}" for k in keys if f"teacher_{k}" in keys}
    keys = [k for k in keys if k not in teacher.values()]
    ncols = min(2, len(keys))  # a report shows figures at most ~700 px wide: two readable panels per row
    nrows = (len(keys) + ncols - 1) // ncols
    fig = Figure(figsize=(3.4 * ncols, 2.3 * nrows + 0.6))
    fig.subplots_adjust(left=0.7 / (3.4 * ncols), right=1 - 0.2 / (3.4 * ncols), bottom=0.45 / (2.3 * nrows + 0.6),
                        hspace=0.7, wspace=0.4)  # fmt: skip
    for i, (key, color) in enumerate(zip(keys, COLORS * 8)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        x, y = epoch_series(rows, key)
        ax.plot(x, y, color=color, marker="o" if len(x) < 30 else None, ms=3, label="student")
        if key in teacher:
            ax.plot(*epoch_series(rows, teacher[key]), "--", color="black", lw=1, label="teacher")
            ax.legend(fontsize=6)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_epochs(ax)
        if i >= len(keys) - ncols:
            ax.set_xlabel("epoch", fontsize=8)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def plot_runs_overlay(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]], ylabel: str, title: str, path: str | Path
) -> Path:
    """One line per run (label → (epochs, values)) on shared axes, legend to the right of the axes."""
    fig, (ax,) = _figure(width=7.5, right=2.4)
    for (label, (x, y)), color in zip(series.items(), COLORS * 4):
        ax.plot(x, y, color=color, marker="o" if len(x) < 30 else None, ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    _integer_epochs(ax)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    ax.set_title(_wrap(title, fig), fontsize=10)
    return _save(fig, path)
