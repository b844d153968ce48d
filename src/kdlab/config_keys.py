"""Every config key with its default and meaning, grouped by section and by method (``kdlab keys``, ``--help``).

Generated from the schema (:class:`kdlab.config.RunConfig`) and the method registry, so it cannot drift from what a
config accepts. ``GROUP`` is a section (``train``, ``data``, ...), ``method`` (every method) or a method name (``kd``).
"""

from __future__ import annotations

import re
from typing import Any

from kdlab.errors import KdlabError, did_you_mean

TOP = "top level"


def _line(key: str, default: str, description: str | None, indent: str = "  ") -> str:
    return f"{indent}{key:<28} {default:<16} {description or ''}".rstrip()


def _summary(doc: str | None) -> str:
    """First line of a docstring without reST markup (``code``, :func:`name`)."""
    line = (doc or "").strip().split("\n")[0]
    return re.sub(r":\w+:`~?([^`]*)`", r"\1", line).replace("``", "")


def _default(field: Any) -> str:
    return "required" if field.is_required() else repr(field.get_default(call_default_factory=True))


def _sub_model(field: Any) -> Any:
    from pydantic import BaseModel

    args = getattr(field.annotation, "__args__", None) or (field.annotation,)
    return next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)


def key_groups() -> dict[str, tuple[str, list[str]]]:
    """``{group: (heading, lines)}``: the top-level keys, one group per section, then ``method`` and one group per
    registered method (its parameters, ``method.<param>``)."""
    from kdlab.config import RunConfig
    from kdlab.methods import METHODS

    groups: dict[str, tuple[str, list[str]]] = {TOP: ("keys outside any section", [])}

    def walk(model: Any, prefix: str, lines: list[str]) -> None:
        for name, field in model.model_fields.items():
            sub = _sub_model(field)
            if sub is not None:
                walk(sub, f"{prefix}{name}.", lines)
            else:
                lines.append(_line(prefix + name, _default(field), field.description))

    for name, field in RunConfig.model_fields.items():
        sub = _sub_model(field)
        if name == "method":
            continue
        if sub is None:
            groups[TOP][1].append(_line(name, _default(field), field.description))
            continue
        lines: list[str] = []
        walk(sub, f"{name}.", lines)
        groups[name] = (_summary(sub.__doc__), lines)
    groups["method"] = (
        "the loss: method.name picks a method; its parameters are method.<param> (kdlab keys METHOD)",
        [_line("method.name", repr("ce"), "one of: " + ", ".join(METHODS))],
    )
    for mname in METHODS:
        cls = METHODS.get(mname)
        doc = _summary(cls.__doc__)
        lines = [_line(f"method.{p}", repr(f.get_default(call_default_factory=True)), f.description)
                 for p, f in cls.Params.model_fields.items()]  # fmt: skip
        groups[f"method {mname}"] = (doc, lines or ["  (no parameters)"])
    return groups


def config_keys_help(group: str | None = None) -> str:
    """The keys of one group (a section, ``method``, or a method name), or of all groups, each under a heading."""
    groups = key_groups()
    if group is not None:
        names = [g for g in groups if g == group or g == f"method {group}"]
        if group == "method":
            names = [g for g in groups if g.startswith("method")]
        if not names:
            choices = [g.removeprefix("method ") for g in groups if g != TOP]
            raise KdlabError(f"unknown key group '{group}'{did_you_mean(group, choices)}; groups: {', '.join(choices)}")
    else:
        names = list(groups)
    out: list[str] = []
    for name in names:
        heading, lines = groups[name]
        out.append(f"[{name}]" + (f"  {heading}" if heading else ""))
        out += lines
        out.append("")
    return "\n".join(out).rstrip()
