"""Results tables of a plan: mean ± std and n over seeds per cell (CSV + markdown), heatmaps, line plots.

* ``results.csv``: one row per (stage, cell) with the axis values, ``n`` (finished seeds) and for each metric its
  mean and sample standard deviation (ddof = 1; empty for n = 1), plus the paper's numbers when the recipe's
  ``meta.paper_top1`` / ``meta.paper_top5`` give them.
* ``results.md``: the same, one markdown table per stage, values as ``mean ± std``.
* ``heatmap_<stage>.png`` for every stage whose cells vary along exactly two axes: training and test accuracy side
  by side (the layout of kl-vs-mse Fig. 3), each cell annotated with mean ± std.
* ``lines_<stage>.png`` for such stages when one of the two axes is numeric: test accuracy against it, one line per
  value of the other axis, ± std bars (the layout of kl-vs-mse Fig. 6).

Metrics: ``final_test_acc`` (last epoch), ``best_test_acc`` (best epoch on the test set, what the CIFAR-100 KD
literature usually reports), ``train_eval_acc`` (training split in eval mode, with the labels the run trained on),
``teacher_test_acc``; their top-5 counterparts ``final_test_top5``, ``best_test_top5`` (top-5 of the best top-1
epoch), ``teacher_test_top5``.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdlab.engine.atomic import atomic_write_text
from kdlab.pipelines.plan import Task

METRICS = {
    "final_test_acc": "test acc %",
    "best_test_acc": "best test acc %",
    "train_eval_acc": "train acc %",
    "teacher_test_acc": "teacher test acc %",
    "final_test_top5": "test top-5 %",
    "best_test_top5": "best top-5 %",
    "teacher_test_top5": "teacher top-5 %",
    "wall_time_s": "wall s",
}


@dataclass
class Stat:
    mean: float
    std: float  # NaN when n < 2
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        vals = [float(v) for v in values if v is not None]
        if not vals:
            return None
        arr = np.asarray(vals, dtype=float)
        return cls(float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else math.nan, len(arr))

    def text(self, digits: int = 2) -> str:
        if math.isnan(self.std):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class CellResult:
    """The runs of one stage and cell, over seeds."""

    stage: str
    cell: tuple[tuple[str, str], ...]
    planned: int
    results: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    method: str = ""
    teacher: str | None = None

    @property
    def n(self) -> int:
        return len(self.results)

    def stat(self, metric: str) -> Stat | None:
        return Stat.of([r.get(metric) for r in self.results])

    @property
    def paper(self) -> float | None:
        return _paper_number(self.meta.get("paper_top1"))

    @property
    def paper5(self) -> float | None:
        return _paper_number(self.meta.get("paper_top5"))


def _paper_number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def collect(tasks: Sequence[Task], results: dict[Path, dict[str, Any]]) -> list[CellResult]:
    """Group the plan's runs by (stage, cell), in plan order; ``results`` maps finished run folders to results."""
    cells: dict[tuple, CellResult] = {}
    for t in tasks:
        key = (t.stage, t.cell)
        c = cells.get(key)
        if c is None:
            meta = {k: v for k, v in t.cfg.meta.items() if k != "pipeline"}
            teacher = t.cfg.teacher.name if (t.cfg.teacher is not None and _uses_teacher(t)) else None
            c = cells[key] = CellResult(t.stage, t.cell, 0, meta=meta, model=t.cfg.model.name,
                                        method=t.cfg.method.name, teacher=teacher)  # fmt: skip
        c.planned += 1
        if t.out in results:
            c.results.append(results[t.out])
    return list(cells.values())


def _uses_teacher(t: Task) -> bool:
    from kdlab.methods import METHODS

    return METHODS.get(t.cfg.method.name).needs_teacher


def varying_axes(cells: Sequence[CellResult]) -> list[str]:
    """Axis names (in order) that take more than one value among ``cells``."""
    if not cells:
        return []
    names = [n for n, _ in cells[0].cell]
    return [n for i, n in enumerate(names) if len({c.cell[i][1] for c in cells}) > 1]


def rows(cells: Sequence[CellResult]) -> list[dict[str, Any]]:
    """Flat rows (CSV): stage, axis values, n, mean/std per metric, paper number."""
    out = []
    for c in cells:
        row: dict[str, Any] = {"stage": c.stage}
        row.update({f"axis:{n}": lab for n, lab in c.cell})
        row.update(model=c.model, method=c.method, teacher=c.teacher or "", n=c.n, planned=c.planned)
        for m in METRICS:
            s = c.stat(m)
            row[f"{m}_mean"] = "" if s is None else round(s.mean, 4)
            row[f"{m}_std"] = "" if s is None or math.isnan(s.std) else round(s.std, 4)
        row["paper_top1"] = "" if c.paper is None else c.paper
        row["paper_top5"] = "" if c.paper5 is None else c.paper5
        row["paper"] = c.meta.get("paper", "")
        out.append(row)
    return out


def to_csv(records: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(records)
    return buf.getvalue()


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in body]
    return "\n".join(lines)


def stage_markdown(cells: Sequence[CellResult], all_axes: bool = False) -> str:
    """One markdown table of a stage's cells: axis values, n, metrics as mean ± std, paper number if any."""
    names = [n for n, _ in cells[0].cell] if all_axes else varying_axes(cells)
    idx = {n: i for i, (n, _) in enumerate(cells[0].cell)}
    show_teacher = any(c.stat("teacher_test_acc") for c in cells)
    show_top5 = any(c.stat("best_test_top5") for c in cells)
    show_paper = any(c.paper is not None for c in cells)
    show_paper5 = any(c.paper5 is not None for c in cells)
    metrics = ("final_test_acc", "best_test_acc", "train_eval_acc") + (("best_test_top5",) if show_top5 else ())
    metrics += ("teacher_test_acc",) if show_teacher else ()
    header = names + ["n"] + [METRICS[m] for m in metrics]
    if show_paper:
        header += ["paper", "Δ best − paper"]
    if show_paper5:
        header += ["paper top-5", "Δ best top-5 − paper"]
    body = []
    for c in cells:
        r = [c.cell[idx[n]][1] for n in names] + [f"{c.n}/{c.planned}" if c.n != c.planned else str(c.n)]
        for m in metrics:
            s = c.stat(m)
            r.append("–" if s is None else s.text())
        for show, paper, metric in ((show_paper, c.paper, "best_test_acc"), (show_paper5, c.paper5, "best_test_top5")):
            if show:
                best = c.stat(metric)
                r.append("–" if paper is None else f"{paper:.2f}")
                r.append("–" if paper is None or best is None else f"{best.mean - paper:+.2f}")
        body.append(r)
    return markdown_table(header, body)


def by_stage(cells: Sequence[CellResult]) -> dict[str, list[CellResult]]:
    out: dict[str, list[CellResult]] = {}
    for c in cells:
        out.setdefault(c.stage, []).append(c)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def heatmap(cells: Sequence[CellResult], axes: tuple[str, str], path: Path, title: str) -> Path:
    """Training and test accuracy (mean ± std over seeds) on the grid of two axes (kl-vs-mse Fig. 3 layout)."""
    from matplotlib.figure import Figure

    from kdlab.instruments.plots import wrap_title

    idx = {n: i for i, (n, _) in enumerate(cells[0].cell)}
    rlab = list(dict.fromkeys(c.cell[idx[axes[0]]][1] for c in cells))
    clab = list(dict.fromkeys(c.cell[idx[axes[1]]][1] for c in cells))
    panels = [("train_eval_acc", "train top-1 (%)"), ("final_test_acc", "test top-1 (%)")]
    fig = Figure(figsize=(2.2 + 2 * 1.1 * len(clab) + 1.5, 1.4 + 0.55 * len(rlab)), layout="constrained")
    for k, (metric, name) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        grid = np.full((len(rlab), len(clab)), np.nan)
        std = np.full_like(grid, np.nan)
        for c in cells:
            s = c.stat(metric)
            if s is not None:
                i, j = rlab.index(c.cell[idx[axes[0]]][1]), clab.index(c.cell[idx[axes[1]]][1])
                grid[i, j], std[i, j] = s.mean, s.std
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(clab)), clab, fontsize=8)
        ax.set_yticks(range(len(rlab)), rlab, fontsize=8)
        ax.set_xlabel(axes[1])
        ax.set_ylabel(axes[0])
        ax.set_title(name, fontsize=9)
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(rlab)):
            for j in range(len(clab)):
                if np.isfinite(grid[i, j]):
                    txt = f"{grid[i, j]:.1f}" + ("" if np.isnan(std[i, j]) else f"\n±{std[i, j]:.1f}")
                    ax.text(j, i, txt, ha="center", va="center", fontsize=6.5,
                            color="black" if grid[i, j] > mid else "white")  # fmt: skip
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.suptitle(wrap_title(title, fig, 9), fontsize=9)
    fig.savefig(path, dpi=120)
    return path


def lines(cells: Sequence[CellResult], x_axis: str, other: str, path: Path, title: str) -> Path:
    """Test accuracy against a numeric axis, one line per value of the other axis (kl-vs-mse Fig. 6 layout)."""
    from matplotlib.figure import Figure

    from kdlab.instruments.plots import wrap_title

    idx = {n: i for i, (n, _) in enumerate(cells[0].cell)}
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for lab in dict.fromkeys(c.cell[idx[other]][1] for c in cells):
        pts = []
        for c in cells:
            s = c.stat("final_test_acc")
            if c.cell[idx[other]][1] == lab and s is not None:
                pts.append((float(c.cell[idx[x_axis]][1]), s.mean, 0.0 if math.isnan(s.std) else s.std))
        if pts:
            pts.sort()
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", ms=3, capsize=2, label=f"{other}={lab}")
    ax.set_xlabel(x_axis)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(wrap_title(title, fig, 9), fontsize=9)  # long study titles would be cut at the figure's edges
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return path


def write_tables(root: Path, tasks: Sequence[Task], results: dict[Path, dict[str, Any]], title: str = "") -> list[Path]:
    """Write ``results.csv``, ``results.md`` and the figures into ``root``; returns the paths written."""
    cells = collect(tasks, results)
    written = []
    atomic_write_text(root / "results.csv", to_csv(rows(cells)))
    written.append(root / "results.csv")
    parts = [f"# {title or 'results'}", ""]
    nseeds = sorted({c.planned for c in cells})
    parts.append(
        f"mean ± sample std over seeds; n = finished seeds per cell (planned: {', '.join(map(str, nseeds))}). "
        "test acc: last epoch; best test acc: best epoch (best top-5: that epoch's top-5); "
        "train acc: training split in eval mode."
    )
    for stage, group in by_stage(cells).items():
        parts += ["", f"## {stage}", ""] if len(by_stage(cells)) > 1 else [""]
        fixed = [f"{n}={lab}" for n, lab in group[0].cell if n not in varying_axes(group)]
        models = list(dict.fromkeys(c.model for c in group))
        teachers = list(dict.fromkeys(c.teacher for c in group if c.teacher))
        desc = ", ".join(models) + (f" ← {', '.join(teachers)}" if teachers else "")
        parts.append(f"{desc}" + (f"; fixed: {', '.join(fixed)}" if fixed else ""))
        parts += ["", stage_markdown(group)]
        var = varying_axes(group)
        if len(var) == 2 and any(c.n for c in group):
            name = f"{title or stage}: {stage}" if len(by_stage(cells)) > 1 else (title or stage)
            hm = heatmap(group, (var[0], var[1]), root / f"heatmap_{stage}.png", f"{name} (mean over seeds)")
            written.append(hm)
            parts += ["", f"![{stage} heatmap]({hm.name})"]
            num = [a for a in var if all(_is_number(c.cell[[n for n, _ in c.cell].index(a)][1]) for c in group)]
            if num:
                other = var[1] if num[0] == var[0] else var[0]
                ln = lines(group, num[0], other, root / f"lines_{stage}.png", f"{name}: test accuracy vs {num[0]}")
                written.append(ln)
                parts += ["", f"![{stage} lines]({ln.name})"]
    atomic_write_text(root / "results.md", "\n".join(parts) + "\n")
    written.insert(1, root / "results.md")
    return written
