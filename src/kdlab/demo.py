"""``kdlab demo``: the whole pipeline on MNIST-1D in a few minutes on a laptop CPU.

Trains the CNN teacher, then distills the MLP student with CE only, KD and MSE over several seeds, and writes
``results.md`` (method, test accuracy mean ± std, seeds) and ``results.png`` (bar chart) to the output folder.
Runs that already finished in the output folder with the same config are reused; interrupted ones are resumed.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from kdlab import environment
from kdlab.config import RunConfig, load_config
from kdlab.data import build_dataset
from kdlab.engine import Trainer
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import FolderLock, entries, is_run_dir, remove_run, remove_stale_temps
from kdlab.errors import KdlabError
from kdlab.fileio import read_json

#: the files ``kdlab demo`` writes at the top of its folder (besides the run folders teacher/ and students/*)
DEMO_FILES = ("demo.json", "results.md", "results.png")
#: the default demo (issue 2): CE only, KD and MSE
STUDENT_RECIPES = {"CE (no teacher)": "student_ce.yaml", "KD (T=4)": "student_kd.yaml", "MSE (logits)": "student_mse.yaml"}
#: ``kdlab demo --methods all``: every logit method of the catalog, with and without Z-score standardization
CATALOG_RECIPES = {
    **STUDENT_RECIPES,
    "KD + Z-score": "student_kd_zscore.yaml",
    "KD T=inf (kd_inf)": "student_kd_inf.yaml",
    "LM": "student_lm.yaml",
    "DKD": "student_dkd.yaml",
    "DKD + Z-score": "student_dkd_zscore.yaml",
    "CTKD": "student_ctkd.yaml",
    "CTKD + Z-score": "student_ctkd_zscore.yaml",
    "MLKD (2 views)": "student_mlkd.yaml",
    "MLKD + Z-score (2 views)": "student_mlkd_zscore.yaml",
}


def recipe_path(name: str) -> Path:
    """Path of a recipe shipped with kdlab (``configs/mnist1d/<name>``)."""
    return Path(str(resources.files("kdlab") / "configs" / "mnist1d" / name))


def _run_or_reuse(cfg: RunConfig, out: Path, log, **kwargs) -> dict:
    """Reuse a finished run with the same config, resume an interrupted one, or start it."""
    if (out / "summary.json").is_file() and load_config(out / "config.yaml").to_dict() == cfg.to_dict():
        return read_json(out / "summary.json", "json", "run summary")
    resume = is_run_dir(out)
    return Trainer(cfg, out, resume=resume, log=log, **kwargs).run().summary


def results_table(rows: dict[str, list[float]], teacher_acc: float) -> str:
    lines = ["| method | test accuracy (%) | seeds |", "|---|---|---|", f"| teacher mnist1d_cnn | {teacher_acc:.2f} | 1 |"]
    for name, accs in rows.items():
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| student mnist1d_mlp, {name} | {statistics.mean(accs):.2f} ± {sd:.2f} | {len(accs)} |")
    return "\n".join(lines)


def environment_section(summaries: list[dict]) -> str:
    """The environment the runs were computed in (``summary.json`` ``environment``, :mod:`kdlab.environment`), as a
    markdown section; runs reused from an earlier demo in another environment are counted and pointed to."""
    here = environment.record()
    recorded = [s.get("environment") for s in summaries]
    envs = [e for e in recorded if e is not None]
    same = envs and all(e == envs[0] for e in envs)
    lines = ["Environment (`kdlab.environment`; exact only for this environment, see the README for the spread "
             "elsewhere):", "", environment.markdown(envs[0] if same else here)]  # fmt: skip
    others = sum(e != here for e in envs) if not same else 0
    unknown = len(recorded) - len(envs)
    if others or unknown:
        lines.append(f"- {others + unknown} of the {len(recorded)} runs were reused from a demo in another (or an "
                     "unrecorded) environment: see their summary.json")  # fmt: skip
    return "\n".join(lines)


def bar_chart(rows: dict[str, list[float]], teacher_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    means = [statistics.mean(v) for v in rows.values()]
    sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in rows.values()]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    fig.set_size_inches(max(6, 0.9 * len(names)), 3.6)
    ax.bar(names, means, yerr=sds, capsize=5, color=(["#8c8c8c"] + ["#4c72b0", "#dd8452"] * len(names))[: len(names)])
    ax.tick_params(axis="x", labelrotation=30 if len(names) > 3 else 0, labelsize=8)
    ax.axhline(teacher_acc, ls="--", color="k", lw=1, label=f"teacher CNN {teacher_acc:.1f}%")
    ax.set_ylim(0, 114)  # bars start at zero: a truncated axis would exaggerate the gaps between methods
    ax.set_yticks(range(0, 101, 20))
    for i, (m, sd) in enumerate(zip(means, sds)):  # the numbers themselves, since the gaps are small at this scale
        ax.text(i, m + sd + 1.5, f"{m:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    n = max(len(v) for v in rows.values())
    ax.set_title(f"MNIST-1D: MLP student distilled from a CNN teacher (mean ± std, {n} seeds)")
    ax.title.set_fontsize(9)
    ax.legend(loc="upper left", fontsize=8)  # above the teacher's line, clear of the bars
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    out: str | Path = "demo_out",
    seeds: int = 3,
    teacher_epochs: int = 30,
    student_epochs: int = 40,
    overwrite: bool = False,
    log=None,
    recipes: dict[str, str] | None = None,
) -> str:
    """Run the demo and return the markdown table (also printed and written to ``out/results.md``)."""
    if seeds < 1 or teacher_epochs < 1 or student_epochs < 1:
        raise KdlabError("--seeds, --teacher-epochs and --student-epochs must be positive")
    out = Path(out)
    with FolderLock(out):  # one demo writes a folder at a time; a failed start leaves no folder behind
        if entries(out) and not (out / "demo.json").is_file():
            raise KdlabError(f"{out} is not empty and is not a kdlab demo folder; choose another --out")
        if overwrite:
            clear_demo(out)
        remove_stale_temps(out, ())
        atomic_write_text(out / "demo.json", json.dumps({"seeds": seeds, "teacher_epochs": teacher_epochs,
                                                         "student_epochs": student_epochs}))  # fmt: skip
        return _demo(out, seeds, teacher_epochs, student_epochs, log, recipes)


def clear_demo(out: Path) -> None:
    """``demo --overwrite``: remove what the demo wrote (its files and run folders), nothing else in ``out``."""
    for name in DEMO_FILES:
        (out / name).unlink(missing_ok=True)
    runs = [out / "teacher"] + (sorted((out / "students").iterdir()) if (out / "students").is_dir() else [])
    for run_dir in runs:
        if run_dir.is_dir() and is_run_dir(run_dir):
            remove_run(run_dir)
    with contextlib.suppress(OSError):
        (out / "students").rmdir()


def _demo(
    out: Path, seeds: int, teacher_epochs: int, student_epochs: int, log: Any, recipes: dict[str, str] | None
) -> str:
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    quiet = ["train.progress=false"]

    teacher_cfg = load_config(recipe_path("teacher_cnn.yaml"), quiet + [f"train.epochs={teacher_epochs}"])
    dataset = build_dataset(teacher_cfg.data)
    log(f"[demo] MNIST-1D: {len(dataset.train)} train / {len(dataset.test)} test samples; training the CNN teacher")
    teacher_dir = out / "teacher"
    teacher = _run_or_reuse(teacher_cfg, teacher_dir, lambda m: log(f"[demo] teacher {m}"), dataset=dataset)
    log(f"[demo] teacher test accuracy {teacher['final_test_acc']:.2f}% ({time.perf_counter() - t0:.0f}s)")

    rows: dict[str, list[float]] = {}
    summaries: list[dict] = []
    for label, recipe in (recipes or STUDENT_RECIPES).items():
        for seed in range(seeds):
            over = quiet + [f"seed={seed}", f"train.epochs={student_epochs}"]
            cfg = load_config(recipe_path(recipe), over)
            if cfg.teacher is not None:
                cfg.teacher.checkpoint = str(teacher_dir)
            run_dir = out / "students" / f"{Path(recipe).stem}_seed{seed}"
            s = _run_or_reuse(cfg, run_dir, lambda m: None, dataset=dataset)
            summaries.append(s)
            rows.setdefault(label, []).append(s["final_test_acc"])
            log(f"[demo] {label:<16} seed {seed}: {s['final_test_acc']:.2f}% ({time.perf_counter() - t0:.0f}s)")

    table = results_table(rows, teacher["final_test_acc"])
    table += "\n\n" + environment_section([teacher, *summaries])
    atomic_write_text(out / "results.md", table + "\n")
    bar_chart(rows, teacher["final_test_acc"], out / "results.png")
    print(table)
    print(f"\nwrote {out / 'results.md'} and {out / 'results.png'} in {time.perf_counter() - t0:.0f}s")
    return table
