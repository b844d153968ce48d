"""Experiment plans: a recipe, or a chain of stages, crossed with grid axes and seeds, expanded into runs.

A *plan* is what ``kdlab sweep`` and ``kdlab chain`` execute. It is read from either

* a plain recipe (one stage) plus ``--grid key=v1,v2`` axes and ``--seeds N``, or
* a *study spec*, a YAML file with a ``recipe:`` (one stage) or ``stages:`` (a chain) key::

      recipe: ../student_kd.yaml          # or stages: [...], see below
      overrides: {train.epochs: 20}       # applied to every stage (mapping, or a list of "key=value")
      grid:                               # axes crossed with each other, applied to every stage
        method.temperature: [1, 4, 20]    #   plain axis: a key and its values
        alpha:                            #   named axis: label -> overrides (several keys move together)
          "0.1": {method.kd_weight: 0.1, method.ce_weight: 0.9}
          "1.0": {method.kd_weight: 1.0, method.ce_weight: 0.0}
      seeds: 3                            # or an explicit list [0, 1, 2]
      teacher_cache: 1                    # optional: replay teacher outputs from a cache of V views (see below)
      stages:                             # a chain (sequential distillation, kl-vs-mse Table 6)
        - name: large
          recipe: teacher_cnn.yaml
        - name: small
          recipe: student_kd.yaml         # its teacher is the previous stage's student (default), or
          teacher: large                  #   an earlier stage by name, or `recipe` (the recipe's own teacher)
          grid: {...}                     # axes of this stage only; stages taught by it inherit them
          meta: {paper_top1: 74.84}       # or per cell, nested by axis labels: {paper_top1: {KL: 74.84, MSE: 75.54}}
        # a stage with `seed: 0` runs once with that seed and teaches the runs of every seed below it;
        # `ensemble: [stage, ...]` adds those stages' students as ensemble teachers (logits averaged, §4.3)


Every run of a stage is one cell of the product of its axes (the plan's axes, then the axes of its teacher's stage
lineage, then its own) times one seed. A stage's run with seed ``s`` and axis values ``c`` is taught by the teacher
stage's run with the same seed and the same values of the teacher's axes, so a teacher is trained once and shared by
every student cell that only differs in the student's own axes. Inherited axes only select the teacher run: their
overrides apply to the stage that declares them (and plan-level axes to every stage).

Overrides are applied in this order: recipe, spec ``overrides``, stage ``overrides``, command-line ``key=value``,
axis values (in axis order), the chained teacher (``teacher.name/kwargs/checkpoint``), the seed. Axis values that
are mappings replace a whole section (``method={name: kd_inf}`` switches the method and drops the old parameters).

``teacher_cache: V`` (or ``--teacher-cache V``) gives every distillation run ``teacher.cache`` = a teacher-output
cache of ``V`` augmented views in ``OUT/.teacher_cache/``, built once per teacher and data (just before the first
run that needs it; rebuilt if the teacher's weights changed) and replayed by all its students, whatever their
method or seed (:mod:`kdlab.engine.teacher_cache`). Without augmentation (MNIST-1D) one view replays the teacher
exactly (float32); with augmentation, ``V`` < epochs is the FKD-style approximation.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdlab.config import RunConfig, read_recipe, set_dotted, validate
from kdlab.errors import ConfigError, KdlabError
from kdlab.pipelines.axes import Axis, Override, label_of
from kdlab.pipelines.plan_cache import with_cache


@dataclass
class Stage:
    name: str
    recipe: Path
    overrides: tuple[Override, ...] = ()
    axes: list[Axis] = field(default_factory=list)
    teacher: str | None = None  # None: automatic (previous stage when the method needs a teacher)
    meta: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None  # a fixed seed: the stage runs once and teaches every seed of its students
    ensemble: list[str] = field(default_factory=list)  # earlier stages whose students join the teacher ensemble


@dataclass
class Task:
    """One run of the plan: a stage, a cell of its axes, a seed, its folder and its resolved config."""

    stage: str
    cell: tuple[tuple[str, str], ...]
    seed: int | None
    out: Path
    cfg: RunConfig
    teacher: Task | None = None
    ensemble: list[Task] = field(default_factory=list)

    @property
    def sources(self) -> list[Task]:
        """The runs this run needs finished first (its teacher and ensemble members)."""
        return ([self.teacher] if self.teacher is not None else []) + self.ensemble

    @property
    def key(self) -> tuple[str, tuple[tuple[str, str], ...], int | None]:
        return (self.stage, self.cell, self.seed)

    def rel(self, root: Path) -> str:
        try:
            return str(self.out.relative_to(root))
        except ValueError:
            return str(self.out)


def _set(raw: dict[str, Any], parts: tuple[str, ...], value: Any, where: str) -> None:
    set_dotted(raw, parts, _copy(value), where)


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


_UNSAFE = re.compile(r"[^\w.,=+\-\[\]@]+")


def cell_dirname(cell: Sequence[tuple[str, str]]) -> str:
    """Folder name of a cell, e.g. ``method.temperature=4,alpha=0.9`` (long names are shortened with a hash)."""
    text = ",".join(f"{name}={label}" for name, label in cell)
    safe = _UNSAFE.sub("_", text).strip("._") or "cell"
    if len(safe) > 120:
        safe = safe[:100] + "-" + hashlib.sha256(text.encode()).hexdigest()[:10]
    return safe


@dataclass
class Plan:
    """Stages × axes × seeds; :meth:`expand` turns it into :class:`Task` objects with validated configs."""

    stages: list[Stage]
    axes: list[Axis] = field(default_factory=list)
    seeds: list[int] | None = None
    overrides: tuple[Override, ...] = ()  # spec-level
    cli_overrides: tuple[Override, ...] = ()
    source: str = ""
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    teacher_cache: int | None = None  # views of a plan-made teacher-output cache
    _recipes: dict[Path, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def single(self) -> bool:
        return len(self.stages) == 1

    # ----------------------------------------------------------------------------------------------------------------

    def stage_axes(self) -> dict[str, list[Axis]]:
        """All axes of each stage: the plan's, its teacher lineage's, then its own (names must be unique)."""
        lineage: dict[str, list[Axis]] = {}
        out: dict[str, list[Axis]] = {}
        for st in self.stages:
            teacher = self._teacher_stage(st)
            inherited: list[Axis] = []
            for src in ([teacher] if teacher else []) + self._ensemble_stages(st):
                inherited += [a for a in lineage[src] if not any(a is b for b in inherited)]
            own = inherited + st.axes
            lineage[st.name] = own
            axes = self.axes + own
            names = [a.name for a in axes]
            dup = next((n for n in names if names.count(n) > 1), None)
            if dup:
                raise ConfigError(f"stage '{st.name}': grid axis '{dup}' is given twice (rename one of them)")
            out[st.name] = axes
        return out

    def _teacher_stage(self, st: Stage) -> str | None:
        """The stage whose runs teach ``st`` (``None``: the recipe's own teacher section, or no teacher)."""
        names = [s.name for s in self.stages]
        idx = names.index(st.name)
        if st.teacher == "recipe":
            return None
        if st.teacher is not None:
            if st.teacher not in names[:idx]:
                raise ConfigError(
                    f"stage '{st.name}': teacher '{st.teacher}' is not an earlier stage (earlier: {', '.join(names[:idx]) or 'none'})"
                )
            return st.teacher
        if idx == 0:
            return None
        return names[idx - 1] if self._needs_teacher(st) else None

    def _ensemble_stages(self, st: Stage) -> list[str]:
        names = [s.name for s in self.stages]
        earlier = names[: names.index(st.name)]
        for m in st.ensemble:
            if m not in earlier:
                raise ConfigError(f"stage '{st.name}': ensemble member '{m}' is not an earlier stage")
        if st.ensemble and self._teacher_stage(st) is None:
            raise ConfigError(f"stage '{st.name}': an ensemble needs a teacher stage (set teacher: <stage>)")
        return list(st.ensemble)

    def _needs_teacher(self, st: Stage) -> bool:
        from kdlab.methods import METHODS

        raw = self._raw(st, ())
        name = (raw.get("method") or {}).get("name", "ce")
        try:
            return METHODS.get(name).needs_teacher
        except KdlabError:
            return False  # reported properly when the config is validated

    def _raw(self, st: Stage, cell_overrides: Sequence[Override]) -> dict[str, Any]:
        where = f"stage '{st.name}'" if not self.single else str(st.recipe)
        if st.recipe not in self._recipes:
            self._recipes[st.recipe] = read_recipe(st.recipe)
        raw = _copy(self._recipes[st.recipe])
        # notes: the recipe's, then the spec's, then the stage's (``paper_top1: null`` removes a recipe's number)
        meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
        raw["meta"] = {**meta, **_copy(self.meta), **_copy(st.meta)}
        for group in (self.overrides, st.overrides, self.cli_overrides, cell_overrides):
            for parts, value in group:
                _set(raw, parts, value, where)
        return raw

    def expand(self, out: Path) -> list[Task]:
        """Every run of the plan in execution order (teachers before their students), configs validated."""
        out = Path(out)
        axes_of = self.stage_axes()
        tasks: dict[tuple, Task] = {}
        ordered: list[Task] = []
        fixed_seed = {st.name: st.seed for st in self.stages}

        def source_key(stage: str, cell: tuple, seed: int | None) -> tuple:
            names = {a.name for a in axes_of[stage]}
            return (stage, tuple((n, lab) for n, lab in cell if n in names),
                    fixed_seed[stage] if fixed_seed[stage] is not None else seed)  # fmt: skip

        for st in self.stages:
            axes = axes_of[st.name]
            own_axes = self.axes + st.axes
            teacher_stage = self._teacher_stage(st)
            members = self._ensemble_stages(st)
            for combo in itertools.product(*[a.labels for a in axes]):
                cell = tuple((a.name, lab) for a, lab in zip(axes, combo))
                # inherited axes (of the teacher's stages) only pick the teacher run; their overrides are theirs
                cell_ov = [ov for a, lab in zip(axes, combo) if any(a is b for b in own_axes) for ov in a.overrides_for(lab)]
                seeds = [st.seed] if st.seed is not None else (self.seeds if self.seeds is not None else [None])
                for seed in seeds:
                    raw = self._raw(st, cell_ov)
                    teacher, ensemble = None, []
                    if teacher_stage:
                        teacher = tasks[source_key(teacher_stage, cell, seed)]
                        ensemble = [tasks[source_key(m, cell, seed)] for m in members]
                        _inject_teacher(raw, teacher, ensemble)
                    if seed is not None:
                        raw["seed"] = seed
                    meta = raw.get("meta") if isinstance(raw.get("meta"), dict) else {}
                    if isinstance(meta.get("paper_top1"), dict):
                        meta["paper_top1"] = paper_number(meta["paper_top1"], [lab for _, lab in cell])
                    meta["pipeline"] = {"stage": st.name, "cell": dict(cell)}
                    raw["meta"] = meta
                    _set(raw, ("train", "progress"), False, st.name)
                    label = f"{st.name} {cell_dirname(cell)}" if cell else st.name
                    try:
                        cfg = validate(raw)
                        if self.teacher_cache:
                            cfg = with_cache(cfg, out, self.teacher_cache)
                    except KdlabError as err:
                        raise ConfigError(f"{label if not self.single else st.recipe}: {err}") from None
                    folder = out if self.single else out / st.name
                    if cell:
                        folder = folder / cell_dirname(cell)
                    folder = folder / f"seed_{cfg.seed}"
                    task = Task(st.name, cell, seed, folder, cfg, teacher, ensemble)
                    if task.key in tasks:
                        raise ConfigError(f"stage '{st.name}': two runs map to {folder}")
                    tasks[task.key] = task
                    ordered.append(task)
        dirs = [t.out for t in ordered]
        if len(set(dirs)) != len(dirs):
            dup = next(d for d in dirs if dirs.count(d) > 1)
            raise ConfigError(f"two runs of the plan map to the same folder {dup} (do two grid values share a label?)")
        return ordered

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "description": self.description,
            "seeds": self.seeds,
            "axes": [a.describe() for a in self.axes],
            "stages": [
                {"name": s.name, "recipe": str(s.recipe), "teacher": self._teacher_stage(s), "seed": s.seed,
                 "ensemble": s.ensemble,
                 "axes": [a.describe() for a in s.axes]}
                for s in self.stages
            ],
        }  # fmt: skip


def _model_section(task: Task) -> dict[str, Any]:
    m = task.cfg.model
    sec: dict[str, Any] = {"name": m.name, "kwargs": _copy(m.kwargs), "checkpoint": str(task.out)}
    if m.classifier is not None:
        sec["classifier"] = m.classifier
    if m.features is not None:
        sec["features"] = m.features
    return sec


def paper_number(table: Any, labels: Sequence[str]) -> float | None:
    """Look a cell up in a nested ``meta.paper_top1`` mapping indexed by the cell's axis labels, in axis order.

    ``{"z": {0.9: 73.60, 3.0: 74.38}}`` gives 74.38 for the cell (``z``, ``3.0``); a missing entry gives ``None``
    (the cell has no paper number). Levels may stop early: a number at depth k applies to all deeper cells.
    """
    node = table
    for lab in labels:
        if not isinstance(node, dict):
            break
        match = [v for k, v in node.items() if label_of(k) == lab]
        if not match:
            return None
        node = match[0]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    return None


def _inject_teacher(raw: dict[str, Any], teacher: Task, ensemble: list[Task]) -> None:
    """Make ``teacher``'s student the teacher of this run (architecture, kwargs, final weights), plus ensemble members.

    A teacher-output cache of the recipe is dropped (it belongs to another teacher); the recipe's own ensemble
    members are replaced when the stage names ``ensemble`` stages and kept otherwise.
    """
    sec = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    sec = {k: v for k, v in sec.items() if k not in ("name", "kwargs", "classifier", "features", "checkpoint", "cache")}
    sec.update(_model_section(teacher))
    if ensemble:
        sec["ensemble"] = [_model_section(t) for t in ensemble]
    raw["teacher"] = sec
