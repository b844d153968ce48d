"""Reading a plan: a recipe plus ``--grid`` / ``--seeds``, or a study spec (``recipe:`` or ``stages:``); see
:mod:`kdlab.pipelines.plan` for the format."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdlab.config import read_recipe, read_yaml
from kdlab.errors import ConfigError
from kdlab.pipelines.axes import overrides_from, parse_grid_arg, parse_grid_spec, split_top_level, yaml_value
from kdlab.pipelines.plan import Plan, Stage

SPEC_KEYS = {"recipe", "stages", "overrides", "grid", "seeds", "meta", "description", "teacher_cache"}
STAGE_KEYS = {"name", "recipe", "overrides", "grid", "teacher", "ensemble", "meta", "seed"}


def parse_seeds(value: Any, where: str = "--seeds") -> list[int] | None:
    """``3`` → ``[0, 1, 2]``; ``"0,4,7"`` or ``[0, 4, 7]`` → that list; ``None`` → ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [s for s in split_top_level(value) if s]
        if len(items) == 1 and "," not in value:
            value = items[0]
        else:
            value = [yaml_value(s) for s in items]
        if isinstance(value, str):
            value = yaml_value(value)
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
    cli_ov = overrides_from(list(overrides), "overrides")
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
                name, _rel(path, item["recipe"], where), overrides_from(item.get("overrides"), f"{where}: stage '{name}'"),
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
        overrides_from(raw.get("overrides"), f"{where}: overrides"), cli_ov, source=str(path),
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
