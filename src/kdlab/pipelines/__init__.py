"""Experiment pipelines: sweeps (grid × seeds), sequential chains, results tables, comparison with the papers.

``run_plan(load_plan(...), out)`` is what ``kdlab sweep`` and ``kdlab chain`` do:

1. expand the plan into runs and validate every run's config (nothing runs if one is wrong);
2. skip finished runs, resume interrupted ones, run the rest (in this process, ``jobs`` worker processes, or as
   Slurm jobs with ``launcher.name=slurm``: :mod:`kdlab.launch`);
3. write ``plan.json``, ``results.csv``, ``results.md`` and, for two-axis grids, heatmaps and line plots.

``plan_status(out)`` tells where each run of a plan folder stands (``kdlab sweep --status``); ``cancel_plan(out)``
stops its queued and running jobs.

Ensemble teachers (``teacher.ensemble``) and label noise (``data.label_noise``) are config keys, so they are swept
like any other key; an under-trained teacher is a teacher stage with few epochs (kl-vs-mse Table 4).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.engine.atomic import atomic_write_text
from kdlab.errors import KdlabError
from kdlab.pipelines.axes import Axis, parse_grid_arg
from kdlab.pipelines.compare import compare_rows, comparison_csv, comparison_markdown, comparison_records, find_runs
from kdlab.pipelines.plan import Plan, Stage, Task
from kdlab.pipelines.runner import (
    Outcome, execute, is_finished, load_result, plan_launcher, plan_lock, preflight, submit, task_status,
)
from kdlab.pipelines.spec import load_plan, parse_seeds
from kdlab.pipelines.status import cancel_plan, plan_status
from kdlab.pipelines.tables import write_tables


@dataclass
class PlanResult:
    out: Path
    tasks: list[Task]
    outcomes: list[Outcome] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in ("failed", "skipped")]

    @property
    def submitted(self) -> list[Outcome]:
        """Runs handed to a launcher that were not followed to their end (``--launcher slurm`` without ``--wait``)."""
        return [o for o in self.outcomes if o.status in ("submitted", "queued")]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def dry_run(tasks: list[Task], log: Callable[[str], None] = _log) -> None:
    """Build data, models and method of the plan's runs, writing nothing (like ``distill --dry-run``).

    Every run's config was validated when the plan was expanded; here one run per stage and *structure* is built:
    runs that differ only in seed or in real-valued settings (loss weights, temperatures, learning rates) build the
    same objects. A teacher that is an earlier stage of the plan and is not trained yet gets random weights.
    """
    from kdlab.data import build_dataset
    from kdlab.engine import Trainer
    from kdlab.engine.teachers import EnsembleTeacher
    from kdlab.methods import METHODS
    from kdlab.models import build

    datasets: dict[str, Any] = {}
    seen: set[tuple] = set()
    with tempfile.TemporaryDirectory() as tmp:
        for t in tasks:
            structure = (t.stage, json.dumps({
                "model": t.cfg.model.model_dump(mode="json"), "data": t.cfg.data.model_dump(mode="json"),
                "teacher": None if t.cfg.teacher is None else t.cfg.teacher.model_dump(
                    mode="json", exclude={"checkpoint": True, "cache": True, "ensemble": {"__all__": {"checkpoint"}}}),
                "method": [t.cfg.method.name, {k: v for k, v in t.cfg.method.params().items() if not isinstance(v, float)}],
                "instruments": t.cfg.instruments,
            }, sort_keys=True, default=str))  # fmt: skip
            if structure in seen:
                continue
            seen.add(structure)
            key = json.dumps(t.cfg.data.model_dump(mode="json"), sort_keys=True)
            if key not in datasets:
                datasets[key] = build_dataset(t.cfg.data)
            data = datasets[key]
            teacher = None
            if t.sources and METHODS.get(t.cfg.method.name).needs_teacher and not all(is_finished(s.out) for s in t.sources):
                members = [build(s.cfg.model, num_classes=data.num_classes) for s in t.sources]
                teacher = members[0] if len(members) == 1 else EnsembleTeacher(members)
            cfg = t.cfg
            if cfg.teacher is not None and cfg.teacher.cache and not Path(cfg.teacher.cache).is_file():
                cfg = cfg.model_copy(deep=True)  # a plan-made cache is built just before the first run needing it
                assert cfg.teacher is not None
                cfg.teacher.cache = None
            Trainer(cfg, Path(tmp) / "dry-run", dataset=data, teacher=teacher)
            what = f"{t.cfg.model.name} / {t.cfg.method.name}" + (f" / teacher {t.cfg.teacher.name}" if t.cfg.teacher else "")
            log(f"ok  {t.stage} {dict(t.cell) or ''}  {what}".rstrip())


def run_plan(
    plan: Plan,
    out: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    tables_only: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = _log,
    wait: bool = False,
    tables_argv: Sequence[str] | None = None,
) -> PlanResult:
    """Run a plan into ``out`` (resuming whatever is there) and write its tables; see the module docstring.

    The runs' ``launcher`` section says where they run: ``local`` (here; ``jobs`` worker processes) or ``slurm``
    (submitted; with ``wait`` followed to their ends, else a last job, ``tables_argv``, writes the tables).
    Raises :class:`~kdlab.errors.KdlabError` after writing the tables when some runs failed.
    """
    out = Path(out)
    if jobs < 1:
        raise KdlabError(f"--jobs must be at least 1, got {jobs}")
    if out.exists() and not out.is_dir():
        raise KdlabError(f"output path {out} exists and is not a folder")
    tasks = plan.expand(out)
    settings = plan_launcher(tasks)
    if not tables_only:
        preflight(tasks, out, settings, jobs, threads)  # nothing is written or submitted if this refuses
    t0 = time.perf_counter()
    with plan_lock(out):
        status = [task_status(t) for t in tasks]  # validates existing folders before anything runs
        counts = {s: status.count(s) for s in ("done", "resume", "new")}
        log(f"{len(tasks)} runs in {out}: {counts['done']} finished, {counts['resume']} to resume, {counts['new']} new")
        atomic_write_text(out / "plan.json", json.dumps({
            **plan.describe(), "runs": [
                {"dir": t.rel(out), "stage": t.stage, "cell": dict(t.cell), "seed": t.cfg.seed,
                 "teacher": None if t.teacher is None else t.teacher.rel(out),
                 "ensemble": [e.rel(out) for e in t.ensemble]} for t in tasks],
        }, indent=1))  # fmt: skip
        if tables_only:
            outcomes = [Outcome(t, "done" if is_finished(t.out) else "missing") for t in tasks]
        elif settings.name == "local":
            outcomes = execute(tasks, out, jobs=jobs, threads=threads, log=log, verbose=verbose)
        else:
            outcomes = submit(tasks, out, settings, log=log, wait=wait, tables_argv=tables_argv)
        results = {t.out: load_result(t.out) for t in tasks if is_finished(t.out)}
        title = plan.description or Path(plan.source).stem
        written = write_tables(out, tasks, results, title=title)
    res = PlanResult(out, tasks, outcomes, written, time.perf_counter() - t0)
    if res.failed:
        lines = "; ".join(f"{o.task.rel(out)}: {o.error}" for o in res.failed[:3])
        more = f" (and {len(res.failed) - 3} more)" if len(res.failed) > 3 else ""
        raise KdlabError(f"{len(res.failed)} of {len(tasks)} runs failed: {lines}{more}; tables of the others are in {out}")
    return res


__all__ = [
    "Axis", "Outcome", "Plan", "PlanResult", "Stage", "Task", "cancel_plan", "compare_rows", "comparison_csv",
    "comparison_markdown", "comparison_records", "dry_run", "execute", "find_runs", "load_plan", "parse_grid_arg",
    "parse_seeds", "plan_status", "run_plan", "write_tables",
]  # fmt: skip
