"""Grid axes of a plan: a name and, per value, a label and the overrides it applies (``--grid`` and ``grid:``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kdlab.config import parse_override
from kdlab.errors import ConfigError

#: one override: the dotted key split into parts, and its value
Override = tuple[tuple[str, ...], Any]


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


def yaml_value(raw: str) -> Any:
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
    values = [yaml_value(s) for s in items]
    return Axis(key, tuple(label_of(v) for v in values), tuple(((parts, v),) for v in values))


def overrides_from(obj: Any, where: str) -> tuple[Override, ...]:
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
            ovs = tuple(overrides_from(v, f"{where}: grid.{name}.{k}") for k, v in spec.items())
            axes.append(Axis(name, labels, ovs))
        else:
            raise ConfigError(f"{where}: grid.{name} must be a list of values or a mapping label → overrides")
    return axes
