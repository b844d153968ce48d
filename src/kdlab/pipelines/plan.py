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
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import RunConfig, parse_override, read_recipe, read_yaml, set_dotted, validate
from kdlab.errors import ConfigError, KdlabError

#: one override: the dotted key split into parts, and its value
Override = tuple[tuple[str, ...], Any]

SPEC_KEYS = {"recipe", "stages", "overrides", "grid", "seeds", "meta", "description", "teacher_cache"}
STAGE_KEYS = {"name", "recipe", "overrides", "grid", "teacher", "ensemble", "meta", "seed"}


# --------------------------------------------------------------------------------------------------------------------
# axes


def label_of(value: Any) -> str:
    """A short, stable text label of an axis value (used in tables and folder names)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={label_of(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(label_of(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Axis:
    """One grid dimension: a name, and for each value a label and the overrides it applies."""

    name: str
    labels: tuple[str, ...]
    overrides: tuple[tuple[Override, ...], ...]

    def __post_init__(self) -> None:
        if not self.labels:
            raise ConfigError(f"grid axis '{self.name}' has no values")
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"grid axis '{self.name}' lists a value twice: {', '.join(self.labels)}")

    def overrides_for(self, label: str) -> tuple[Override, ...]:
        return self.overrides[self.labels.index(label)]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "values": {lab: {".".join(k): v for k, v in ov}
                                              for lab, ov in zip(self.labels, self.overrides)}}  # fmt: skip


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets, braces and quotes (``1,[2,3],{a: 1, b: 2}`` → three items)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == sep and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _yaml_value(raw: str) -> Any:
    _, value = parse_override(f"x={raw}")
    return value


def parse_grid_arg(text: str) -> Axis:
    """``key=v1,v2,...`` (values read as YAML, commas inside brackets kept) → a plain axis."""
    if "=" not in text:
        raise ConfigError(f"--grid '{text}' must look like key.sub=v1,v2,...")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or not all(key.split(".")):
        raise ConfigError(f"--grid '{text}' has an empty key")
    items = [s for s in split_top_level(raw) if s != ""]
    if not items:
        raise ConfigError(f"--grid '{text}' lists no values")
    parts = tuple(key.split("."))
    values = [_yaml_value(s) for s in items]
    return Axis(key, tuple(label_of(v) for v in values), tuple(((parts, v),) for v in values))


def _overrides_from(obj: Any, where: str) -> tuple[Override, ...]:
    """Overrides given as a mapping ``{dotted.key: value}`` or a list of ``"key=value"`` strings."""
    if obj is None:
        return ()
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            parts = tuple(str(k).split("."))
            if not all(parts):
                raise ConfigError(f"{where}: empty key in '{k}'")
            out.append((parts, v))
        return tuple(out)
    if isinstance(obj, (list, tuple)):
        out = []
        for item in obj:
            if not isinstance(item, str):
                raise ConfigError(f"{where}: overrides must be 'key=value' strings, got {item!r}")
            parts, value = parse_override(item)
            out.append((tuple(parts), value))
        return tuple(out)
    raise ConfigError(f"{where}: overrides must be a mapping or a list of 'key=value' strings")


def parse_grid_spec(grid: Any, where: str) -> list[Axis]:
    """The ``grid:`` mapping of a study spec: ``key: [values]`` (plain) or ``name: {label: overrides}`` (named)."""
    if grid is None:
        return []
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: 'grid' must be a mapping of axis → values")
    axes = []
    for name, spec in grid.items():
        name = str(name)
        if isinstance(spec, list):
            parts = tuple(name.split("."))
            axes.append(Axis(name, tuple(label_of(v) for v in spec), tuple(((parts, v),) for v in spec)))
        elif isinstance(spec, dict):
            labels = tuple(label_of(k) for k in spec)
            ovs = tuple(_overrides_from(v, f"{where}: grid.{name}.{k}") for k, v in spec.items())
            axes.append(Axis(name, labels, ovs))
        else:
            raise ConfigError(f"{where}: grid.{name} must be a list of values or a mapping label → overrides")
    return axes


# --------------------------------------------------------------------------------------------------------------------
# stages, tasks, plan


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
                            cfg = _with_cache(cfg, out, self.teacher_cache)
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


CACHE_DIR = ".teacher_cache"


def _non_default(section: Any, exclude: set[str]) -> dict[str, Any]:
    dump = section.model_dump(mode="json", exclude=exclude)
    fields = type(section).model_fields
    return {k: v for k, v in dump.items() if k not in fields or fields[k].is_required() or v != fields[k].get_default(
        call_default_factory=True)}  # fmt: skip


def same_plan_cache(a: str | None, b: str | None) -> bool:
    """Two plan-made cache paths of the same teacher name and views (they differ at most in their digest)."""
    if not a or not b:
        return False
    pa, pb = Path(a), Path(b)
    if pa.parent.name != CACHE_DIR or pb.parent != pa.parent:
        return False
    return pa.name.rsplit("-", 1)[0] == pb.name.rsplit("-", 1)[0]


def _with_cache(cfg: RunConfig, out: Path, views: int) -> RunConfig:
    """``cfg`` with ``teacher.cache`` set to the plan's cache for its teacher and data (distillation runs only)."""
    from kdlab.methods import build_method
    from kdlab.models.output import STAGE_FIELDS

    method = build_method(cfg.method.name, cfg.method.params())
    if cfg.teacher is None or cfg.teacher.cache or not method.needs_teacher:
        return cfg
    if set(method.teacher_outputs) & set(STAGE_FIELDS):
        return cfg  # stage features are not cached: these runs keep a live teacher
    key = {  # settings left at their defaults are left out, so that new config keys do not rename caches
        "teacher": _non_default(cfg.teacher, exclude={"cache"}),
        "data": _non_default(cfg.data, exclude={"label_noise", "label_noise_seed"}),
        "views": views, "fields": list(method.teacher_outputs),
    }  # fmt: skip
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    raw = cfg.to_dict()
    raw["teacher"]["cache"] = str(out / CACHE_DIR / f"{cfg.teacher.name}-{views}v-{digest}.safetensors")
    raw["meta"].setdefault("pipeline", {})["teacher_cache_views"] = views
    return validate(raw)


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


# --------------------------------------------------------------------------------------------------------------------
# reading plans


def parse_seeds(value: Any, where: str = "--seeds") -> list[int] | None:
    """``3`` → ``[0, 1, 2]``; ``"0,4,7"`` or ``[0, 4, 7]`` → that list; ``None`` → ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [s for s in split_top_level(value) if s]
        if len(items) == 1 and "," not in value:
            value = items[0]
        else:
            value = [_yaml_value(s) for s in items]
        if isinstance(value, str):
            value = _yaml_value(value)
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a count or a list of seeds, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{where}: the number of seeds must be at least 1, got {value}")
        return list(range(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                          for v in value):  # fmt: skip
        if len(set(value)) != len(value):
            raise ConfigError(f"{where}: a seed is listed twice: {value}")
        return list(value)
    raise ConfigError(f"{where}: expected a count or a list of non-negative seeds, got {value!r}")


def is_spec(raw: dict[str, Any]) -> bool:
    """A study spec has ``recipe`` or ``stages`` at the top level (a run recipe never does)."""
    return "recipe" in raw or "stages" in raw


def load_plan(
    path: str | Path,
    grid: Sequence[str] = (),
    seeds: Any = None,
    overrides: Sequence[str] = (),
    teacher_cache: int | None = None,
) -> Plan:
    """A plan from a recipe or a study spec, plus command-line ``--grid`` axes, ``--seeds`` and overrides.

    Command-line seeds (and ``teacher_cache`` views) replace the spec's; command-line axes are appended to the
    spec's plan-level axes.
    """
    if teacher_cache is not None and teacher_cache < 1:
        raise ConfigError(f"--teacher-cache must be a positive number of views, got {teacher_cache}")
    path = Path(path)
    raw = read_yaml(path)
    cli_axes = [parse_grid_arg(g) for g in grid]
    cli_ov = _overrides_from(list(overrides), "overrides")
    if not is_spec(raw):
        read_recipe(path)  # base chain readable
        plan = Plan([Stage("run", path)], cli_axes, parse_seeds(seeds), (), cli_ov, source=str(path),
                    teacher_cache=teacher_cache)  # fmt: skip
        plan.stage_axes()
        return plan
    where = str(path)
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (a study spec has {', '.join(sorted(SPEC_KEYS))})")
    if "recipe" in raw and "stages" in raw:
        raise ConfigError(f"{where}: give either 'recipe' (one stage) or 'stages' (a chain), not both")
    if "recipe" in raw:
        stages = [Stage("run", _rel(path, raw["recipe"], where))]
    else:
        items = raw["stages"]
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: 'stages' must be a non-empty list")
        stages = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "recipe" not in item or "name" not in item:
                raise ConfigError(f"{where}: stage {i + 1} needs 'name' and 'recipe'")
            bad = set(item) - STAGE_KEYS
            if bad:
                raise ConfigError(f"{where}: stage '{item['name']}' has unknown key(s) {', '.join(sorted(bad))}")
            name = str(item["name"])
            if not re.fullmatch(r"[\w.\-]+", name) or name.startswith("."):
                raise ConfigError(f"{where}: stage name '{name}' must be letters, digits, '_', '-' or '.'")
            if any(s.name == name for s in stages):
                raise ConfigError(f"{where}: two stages are named '{name}'")
            teacher = item.get("teacher")
            ensemble = item.get("ensemble") or []
            if not isinstance(ensemble, list) or not all(isinstance(e, str) for e in ensemble):
                raise ConfigError(f"{where}: stage '{name}': ensemble must be a list of stage names")
            seed = item.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
                raise ConfigError(f"{where}: stage '{name}': seed must be a non-negative integer")
            meta = item.get("meta") or {}
            if not isinstance(meta, dict):
                raise ConfigError(f"{where}: stage '{name}': meta must be a mapping")
            stages.append(Stage(
                name, _rel(path, item["recipe"], where), _overrides_from(item.get("overrides"), f"{where}: stage '{name}'"),
                parse_grid_spec(item.get("grid"), f"{where}: stage '{name}'"),
                None if teacher is None else str(teacher), meta, seed, ensemble,
            ))  # fmt: skip
    meta = raw.get("meta") or {}
    views = raw.get("teacher_cache")
    if views is not None and (not isinstance(views, int) or isinstance(views, bool) or views < 1):
        raise ConfigError(f"{where}: teacher_cache must be a positive number of views")
    plan = Plan(
        stages, parse_grid_spec(raw.get("grid"), where) + cli_axes,
        parse_seeds(seeds) if seeds is not None else parse_seeds(raw.get("seeds"), f"{where}: seeds"),
        _overrides_from(raw.get("overrides"), f"{where}: overrides"), cli_ov, source=str(path),
        description=str(raw.get("description") or ""), meta=meta if isinstance(meta, dict) else {},
        teacher_cache=teacher_cache or views,
    )  # fmt: skip
    plan.stage_axes()  # axis names unique, teachers resolvable
    return plan


def _rel(spec: Path, recipe: Any, where: str) -> Path:
    if not isinstance(recipe, str):
        raise ConfigError(f"{where}: 'recipe' must be a file name")
    path = (spec.parent / recipe).resolve()
    if not path.is_file():
        raise ConfigError(f"{where}: recipe not found: {recipe} (paths are relative to the spec file)")
    return path


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
