"""Our numbers next to the papers': runs grouped over seeds, compared with ``meta.paper_top1`` / ``paper_top5``.

A recipe records what the paper reports in its ``meta`` section (``paper``: where, ``paper_top1``: the number,
``paper_top5``: the top-5 number where the paper gives one, e.g. its ImageNet tables).
:func:`compare_rows` finds every finished run below the given paths (single runs, sweeps, chains), groups runs
that differ only in their seed (runs of a plan: by their cell; other runs: by their config without the seed),
and returns one row per group with mean ± std and n of our final and best test accuracy and the difference to the
paper. ``kdlab compare`` prints it; :func:`comparison_markdown` is what a report embeds.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlab.config import read_yaml
from kdlab.errors import KdlabError
from kdlab.pipelines.runner import load_result
from kdlab.pipelines.tables import Stat, markdown_table, to_csv

_SEED_DIR = re.compile(r"^seed_\d+$")
_IGNORED = ("seed", "train.progress", "train.threads", "train.device", "train.eval_batch_size", "meta.pipeline")


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Finished run folders (holding ``summary.json`` and ``config.yaml``) at or below ``paths``, sorted."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise KdlabError(f"no such run or folder: {p}")
        if (p / "summary.json").is_file():
            found.append(p)
            continue
        found += sorted(s.parent for s in p.rglob("summary.json") if (s.parent / "config.yaml").is_file())
    if not found:
        raise KdlabError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return list(dict.fromkeys(found))


def _drop(d: dict[str, Any], dotted: str) -> None:
    *head, last = dotted.split(".")
    for part in head:
        d = d.get(part)  # type: ignore[assignment]
        if not isinstance(d, dict):
            return
    d.pop(last, None)


def _group_key(run: Path, cfg: dict[str, Any]) -> str:
    pipe = (cfg.get("meta") or {}).get("pipeline")
    if pipe and _SEED_DIR.match(run.name):
        return "plan:" + str(run.parent.resolve())
    c = json.loads(json.dumps(cfg))
    for k in _IGNORED:
        _drop(c, k)
    if isinstance(c.get("teacher"), dict):  # the same teacher recipe trained per seed lives in seed_N folders
        c["teacher"]["checkpoint"] = re.sub(r"seed_\d+", "seed_*", str(c["teacher"].get("checkpoint")))
    return "cfg:" + json.dumps(c, sort_keys=True)


def _label(runs: list[Path], cfg: dict[str, Any], base: Path | None) -> str:
    pipe = (cfg.get("meta") or {}).get("pipeline")
    if pipe and _SEED_DIR.match(runs[0].name):
        folder = runs[0].parent
        if base is not None:
            try:
                return str(folder.resolve().relative_to(base.resolve())) or folder.name
            except ValueError:
                pass
        return str(folder)
    names = sorted({re.sub(r"[_-]?seed[_-]?\d+$", "", r.name) for r in runs})
    return ", ".join(names)


def _distills(cfg: dict[str, Any]) -> bool:
    from kdlab.methods import METHODS

    name = (cfg.get("method") or {}).get("name", "ce")
    return bool(cfg.get("teacher")) and name in METHODS and METHODS.get(name).needs_teacher


def compare_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per group of runs: label, model, teacher, method, n, ours (final/best mean ± std), paper, Δ."""
    runs = find_runs(paths)
    groups: dict[str, list[tuple[Path, dict[str, Any], dict[str, Any]]]] = {}
    for r in runs:
        cfg = read_yaml(r / "config.yaml")
        groups.setdefault(_group_key(r, cfg), []).append((r, cfg, load_result(r)))
    dirs = [Path(p).resolve() for p in paths]
    base = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath(dirs))
    out = []
    for members in groups.values():
        cfg = members[0][1]
        meta = cfg.get("meta") or {}
        final = Stat.of([m[2].get("final_test_acc") for m in members])
        best = Stat.of([m[2].get("best_test_acc") for m in members])
        paper, paper5 = _number(meta.get("paper_top1")), _number(meta.get("paper_top5"))
        best5 = Stat.of([m[2].get("best_test_top5") for m in members])
        teacher = cfg.get("teacher") or {}
        out.append({
            "run": _label([m[0] for m in members], cfg, base),
            "model": (cfg.get("model") or {}).get("name"),
            "teacher": teacher.get("name") if _distills(cfg) else None,
            "method": (cfg.get("method") or {}).get("name"),
            "n": len(members),
            "seeds": sorted(m[1].get("seed", 0) for m in members),
            "epochs": members[0][2].get("epochs"),
            "final": final,
            "best": best,
            "best_top5": best5,
            "paper_top1": paper,
            "delta_best": None if paper is None or best is None else best.mean - paper,
            "paper_top5": paper5,
            "delta_best_top5": None if paper5 is None or best5 is None else best5.mean - paper5,
            "paper": meta.get("paper"),
        })  # fmt: skip
    return out


HEADER = ["run", "model", "teacher", "method", "n", "epochs", "ours test %", "ours best %", "paper %", "Δ best − paper",
          "ours best top-5 %", "paper top-5 %", "paper source"]  # fmt: skip


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def comparison_records(rows: Sequence[dict[str, Any]], only_paper: bool = False) -> list[dict[str, str]]:
    """The rows as display strings keyed by column title (for HTML or any other table renderer)."""
    out = []
    for r in rows:
        if only_paper and r["paper_top1"] is None:
            continue
        values = [
            r["run"], r["model"] or "", r["teacher"] or "–", r["method"] or "", str(r["n"]), str(r["epochs"] or ""),
            r["final"].text() if r["final"] else "–", r["best"].text() if r["best"] else "–",
            "–" if r["paper_top1"] is None else f"{r['paper_top1']:.2f}",
            "–" if r["delta_best"] is None else f"{r['delta_best']:+.2f}",
            r["best_top5"].text() if r["best_top5"] else "–",
            "–" if r["paper_top5"] is None else f"{r['paper_top5']:.2f}",
            r["paper"] or "",
        ]  # fmt: skip
        out.append(dict(zip(HEADER, values)))
    return out


def comparison_markdown(rows: Sequence[dict[str, Any]], only_paper: bool = False) -> str:
    """The rows as a markdown table (mean ± std, n; paper number and Δ = our best − paper)."""
    return markdown_table(HEADER, [list(r.values()) for r in comparison_records(rows, only_paper)])


def comparison_csv(rows: Sequence[dict[str, Any]]) -> str:
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if k not in ("final", "best", "best_top5", "seeds")}
        f["seeds"] = " ".join(map(str, r["seeds"]))
        for k in ("final", "best", "best_top5"):
            s: Stat | None = r[k]
            f[f"{k}_mean"] = "" if s is None else round(s.mean, 4)
            f[f"{k}_std"] = "" if s is None or math.isnan(s.std) else round(s.std, 4)
        f["paper_top1"] = "" if r["paper_top1"] is None else r["paper_top1"]
        f["delta_best"] = "" if r["delta_best"] is None else round(r["delta_best"], 4)
        f["paper_top5"] = "" if r["paper_top5"] is None else r["paper_top5"]
        f["delta_best_top5"] = "" if r["delta_best_top5"] is None else round(r["delta_best_top5"], 4)
        flat.append(f)
    return to_csv(flat)
