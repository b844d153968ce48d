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


def _wrap(title: str, fig: Any, fontsize: float = 10) -> str:
    """Wrap each line of a title to the figure's width (titles name runs and can be long)."""
    import textwrap

    chars = max(30, int(fig.get_figwidth() * 72 / (fontsize * 0.55)))
    return "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))


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
    """Scatter plots coloured by class label, one panel per model (template projection, t-SNE)."""
    fig, axes = _figure(len(panels), width=4.6, height=4.2)
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
        if len(classes) <= 12:
            ax.legend(fontsize=7)
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
    ax.set_ylabel(left_label)
    if right:
        ax2 = ax.twinx()
        for label, ys in right.items():
            handles += ax2.plot(epochs, ys, color=next(colors), linestyle="--", label=label)
        ax2.set_ylabel(right_label)
    ax.legend(handles=handles, fontsize=8)
    ax.set_title(_wrap(title, fig), fontsize=10)
    return _save(fig, path)


def plot_theory(theory: Mapping[str, Any], title: str, path: str | Path) -> Path:
    """Relative error of the τ → ∞ limit and mean error of the τ → 0 limit against the temperature (log-log)."""
    fig, axes = _figure(2, width=4.8)
    temps = np.asarray(theory["temperatures"])
    inf_err = np.asarray([np.nan if v is None else v for v in theory["tau_infinity"]["rel_error"]], dtype=float)
    zero_err = np.asarray([np.nan if v is None else v for v in theory["tau_zero"]["mean_abs_error"]], dtype=float)
    axes[0].loglog(temps, np.maximum(inf_err, 1e-300), "o-")
    axes[0].set_xlabel("temperature T")
    axes[0].set_ylabel("‖∇KD_T − ∇KD_∞‖ / ‖∇KD_∞‖")
    slope = theory["tau_infinity"].get("loglog_slope_T_ge_16")
    axes[0].set_title("T → ∞ (kl-vs-mse Eq. 5)" + (f", slope {slope:.2f}" if slope is not None else ""), fontsize=9)
    axes[1].loglog(temps, np.maximum(zero_err, 1e-300), "o-", color="tab:orange")
    axes[1].set_xlabel("temperature T")
    axes[1].set_ylabel("mean |(1/T)∇KD_T − Δ1[argmax]|")
    axes[1].set_title("T → 0 (kl-vs-mse Eq. 6)", fontsize=9)
    fig.suptitle(_wrap(title, fig), fontsize=10)
    return _save(fig, path)
