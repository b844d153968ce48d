"""What a study leaves in ``OUT``: ``results.md``/``results.csv`` (one row per trial), ``importance.md``/``.json``
(how much each searched key explains of the val accuracy) and ``best.yaml`` (the best trial as a ready recipe).

Every accuracy here is on the val split (``data.val_split`` of the training set); no trial read the test split.
``best.yaml`` is the recipe as given (its own ``data.val_split`` and ``data.read_test``) with the best trial's
values set: training it is the next step, and its test accuracy is then the first test number of the search.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import set_dotted, validate
from kdlab.engine.atomic import atomic_write_text
from kdlab.tune.space import Param
from kdlab.tune.study import OBJECTIVES, TuneSpec, counted, replaced, worker_alive


def _state(t: Any, gone: set[int], out: Path) -> str:
    name = t.state.name.lower()
    if t.number in gone:
        return "interrupted (queued again)"
    if name == "running" and not worker_alive(out, t.user_attrs.get("worker")):
        return "interrupted"
    if name == "pruned" and t.intermediate_values:
        return f"pruned at epoch {max(t.intermediate_values)}"
    return name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def trial_rows(study: Any, spec: TuneSpec, params: list[Param], out: Path) -> list[dict[str, Any]]:
    """One row per trial, in trial order."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    gone = replaced(trials)
    rows = []
    for t in trials:
        vals = list(t.intermediate_values.values())
        row: dict[str, Any] = {"trial": t.number, "state": _state(t, gone, out)}
        row.update({p.key: p.value(t.params[p.key]) if p.key in t.params else None for p in params})
        row["val_acc"] = t.value if t.state == TrialState.COMPLETE else None  # Optuna gives pruned ones their last
        row["best_val_acc"] = max(vals) if vals else None
        row["epochs"] = len(vals)
        row["seconds"] = t.user_attrs.get("seconds")
        row["run"] = t.user_attrs.get("run_dir", "")
        row["note"] = t.user_attrs.get("error") or t.user_attrs.get("stopped") or (
            f"resumes trial {t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")  # fmt: skip
        rows.append(row)
    return rows


def importance(study: Any) -> dict[str, float] | str:
    """fANOVA importance of each searched key for the objective over the COMPLETE trials (seeded), or why not."""
    import optuna
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if len(done) < 2:
        return f"needs at least 2 complete trials (has {len(done)})"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator).items()}
    except (RuntimeError, ValueError) as err:  # e.g. every complete trial has the same values
        return f"not computable: {err}"


def best_recipe(spec: TuneSpec, params: list[Param], best: Any, out: Path) -> str:
    """``best.yaml``: the recipe with the best trial's values, validated; with a comment saying where it came from."""
    raw = json.loads(json.dumps(spec.recipe))
    values = {p.key: p.value(best.params[p.key]) for p in params if p.key in best.params}
    for key, v in values.items():
        set_dotted(raw, key.split("."), v, "best trial")
    cfg = validate(raw)
    meta = dict(cfg.meta)
    meta["tune"] = {"study": str(out), "trial": best.number, "objective": OBJECTIVES[spec.objective],
                    "val_acc": best.value, "params": values}  # fmt: skip
    cfg.meta = meta
    head = (f"# kdlab tune: the best of the trials in {out} (trial {best.number}, {OBJECTIVES[spec.objective]} "
            f"{best.value:.2f}% on the val split; the test split was not read).\n"
            f"# Train it on the recipe's own split: kdlab {'distill' if cfg.teacher else 'train'} best.yaml --out RUN\n")  # fmt: skip
    return head + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _markdown(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_report(study: Any, spec: TuneSpec, params: list[Param], out: Path) -> list[Path]:
    """Write the results table, the importances and the best recipe; returns the files written."""
    from optuna.trial import TrialState

    rows = trial_rows(study, spec, params, out)
    written = []
    trials = study.get_trials(deepcopy=False)
    n_counted = len(counted(trials))
    states = [t.state for t in trials if t.number not in replaced(trials)]
    summary = (f"{n_counted} of {spec.trials} trials: " + ", ".join(
        f"{sum(s == st for s in states)} {st.name.lower()}" for st in (
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING)
        if any(s == st for s in states)))  # fmt: skip
    split = spec.base.get("data", {}).get("val_split")
    text = [f"# kdlab tune: {out}", "", summary, "",
            f"Objective: `{OBJECTIVES[spec.objective]}` (maximised), top-1 % on the val split (data.val_split={split}, "
            "held out of the training set); `best_val_acc` is the best epoch's. The test split was never read. "
            f"Sampler {spec.sampler}, pruner {spec.pruner}.", ""]  # fmt: skip
    if rows:
        text.append(_markdown(rows))
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(out / "results.csv", buf.getvalue())
        written.append(out / "results.csv")
    imp = importance(study)
    if isinstance(imp, dict):
        text += ["", "## Importance of each searched key (fANOVA over the complete trials)", "",
                 "| key | importance |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in imp.items()]  # fmt: skip
    else:
        text += ["", f"Importance: {imp}."]
    atomic_write_text(out / "importance.json", json.dumps(imp if isinstance(imp, dict) else {"note": imp}, indent=1))
    written.append(out / "importance.json")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = max(complete, key=lambda t: t.value)
        atomic_write_text(out / "best.yaml", best_recipe(spec, params, best, out))
        written.append(out / "best.yaml")
        text += ["", f"Best: trial {best.number}, {best.value:.2f}% — recipe in best.yaml."]
    atomic_write_text(out / "results.md", "\n".join(text) + "\n")
    return [out / "results.md", *written]
