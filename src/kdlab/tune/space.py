"""The search space of ``kdlab tune``: ``--space 'KEY=KIND(ARGS)'``, one config key per option.

Kinds (a registry, :data:`KINDS`):

* ``uniform(a, b)`` / ``uniform(a, b, step)`` — a float drawn uniformly from ``[a, b]`` (on a grid of ``step``,
  which must divide ``b - a``);
* ``log(a, b)`` — a float drawn log-uniformly from ``[a, b]`` (``0 < a``);
* ``int(a, b)`` / ``int(a, b, step)`` — an integer from ``a … b`` (inclusive);
* ``logint(a, b)`` — an integer from ``a … b``, log-uniformly (``1 ≤ a``);
* ``choice(x, y, …)`` — one of two or more values, each read as YAML (``choice(kd, dkd)``, ``choice(0.1, 1)``,
  ``choice([150, 180], [100, 200])``: commas inside brackets or quotes do not split).

A malformed option is a one-line :class:`~kdlab.errors.UsageError` naming it. Each :class:`Param` maps to an Optuna
distribution; :meth:`Param.corners` gives the values at the ends of its range, which ``kdlab tune`` validates
against the recipe before anything is written (a key the config does not have, a value it refuses).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from kdlab.errors import UsageError
from kdlab.pipelines.axes import split_top_level  # the grid's splitter: commas inside brackets or quotes stay
from kdlab.registry import Registry

_OPTION = re.compile(r"\s*([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)\s*=\s*([a-z]+)\s*\((.*)\)\s*", re.S)
_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` with its ``args`` (numbers, or the choices as YAML texts)."""

    key: str
    kind: str
    args: tuple[Any, ...]
    text: str

    def distribution(self) -> Any:
        """The Optuna distribution of this parameter."""
        return KINDS.get(self.kind).distribution(self)

    def corners(self) -> list[Any]:
        """Config values at the ends of the range (every value of a choice)."""
        if self.kind == "choice":
            return [choice_value(c) for c in self.args]
        return list(self.args[:2])

    def value(self, suggested: Any) -> Any:
        """The config value of an Optuna suggestion (choices that are not scalars travel as their YAML text)."""
        return choice_value(suggested) if self.kind == "choice" else suggested


@dataclass(frozen=True)
class Kind:
    """A space kind: how many arguments, their check, and the Optuna distribution."""

    check: Callable[[str, list[str]], tuple[Any, ...]]
    distribution: Callable[[Param], Any]
    usage: str


KINDS: Registry[Kind] = Registry("space kind")


def choice_value(text: Any) -> Any:
    """A choice as a config value: scalars as they are, a YAML text of a list or mapping parsed."""
    if isinstance(text, str) and text[:1] in "[{":
        return yaml.safe_load(text)
    return text


def _number(text: str, integer: bool) -> float | int:
    """``text`` as an int (``3``) or, unless ``integer``, a float (``0.5``, ``1e-4``); finite."""
    value: float | int | None = None
    for kind in (int,) if integer else (int, float):
        try:
            value = kind(text)
            break
        except ValueError:
            continue
    if value is None or not math.isfinite(value):
        raise ValueError(f"'{text}' is not {'an integer' if integer else 'a finite number'}")
    return value


def _range(integer: bool, log: bool, step: bool) -> Callable[[str, list[str]], tuple[Any, ...]]:
    def check(kind: str, args: list[str]) -> tuple[Any, ...]:
        if len(args) not in ((2, 3) if step else (2,)):
            raise ValueError(f"takes {'2 or 3 arguments' if step else '2 arguments'}, got {len(args)}")
        nums = tuple(_number(a, integer) for a in args)
        lo, hi = nums[0], nums[1]
        if not lo < hi:
            raise ValueError(f"needs low < high, got {lo:g} and {hi:g}")
        if log and (lo < 1 if integer else lo <= 0):
            raise ValueError(f"needs low {'>= 1' if integer else '> 0'} (a log scale), got {lo:g}")
        if len(nums) == 3:
            st = nums[2]
            if not 0 < st <= hi - lo:
                raise ValueError(f"needs 0 < step <= high - low, got step {st:g}")
            if abs(round((hi - lo) / st) * st - (hi - lo)) > 1e-9 * max(1.0, abs(hi - lo)):
                raise ValueError(f"needs high - low to be a multiple of step {st:g}")
        return nums

    return check


def _choice(kind: str, args: list[str]) -> tuple[Any, ...]:
    if len(args) < 2 or any(a == "" for a in args):
        raise ValueError("takes two or more values")
    values = []
    for a in args:
        try:
            v = _number(a, False)  # 1e-6 is a number here (YAML 1.1 would read a string)
        except ValueError:
            try:
                v = yaml.safe_load(a)
            except yaml.YAMLError:
                raise ValueError(f"'{a}' is not a YAML value") from None
        values.append(v if isinstance(v, _SCALARS) else a)  # lists/mappings travel as their text
    if len({repr(v) for v in values}) < len(values):
        raise ValueError("lists a value twice")
    return tuple(values)


def _dist(name: str, **extra: Any) -> Callable[[Param], Any]:
    def make(p: Param) -> Any:
        import optuna.distributions as d

        step = {"step": p.args[2]} if len(p.args) == 3 else {}
        return getattr(d, name)(p.args[0], p.args[1], **step, **extra)

    return make


def _categorical(p: Param) -> Any:
    from optuna.distributions import CategoricalDistribution

    return CategoricalDistribution(list(p.args))


KINDS.add("uniform", Kind(_range(False, False, True), _dist("FloatDistribution"), "uniform(low, high[, step])"))
KINDS.add("log", Kind(_range(False, True, False), _dist("FloatDistribution", log=True), "log(low, high)"))
KINDS.add("int", Kind(_range(True, False, True), _dist("IntDistribution"), "int(low, high[, step])"))
KINDS.add("logint", Kind(_range(True, True, False), _dist("IntDistribution", log=True), "logint(low, high)"))
KINDS.add("choice", Kind(_choice, _categorical, "choice(value, value, ...)"))


def parse_param(text: str) -> Param:
    """Parse one ``--space`` option (one-line :class:`UsageError` when malformed)."""
    kinds = ", ".join(KINDS.get(k).usage for k in KINDS)
    m = _OPTION.fullmatch(text)
    if m is None:
        raise UsageError(f"--space '{text}' must look like key.sub=KIND(ARGS), KIND one of: {kinds}")
    key, kind, body = m.groups()
    if kind not in KINDS:
        raise UsageError(f"--space '{text}': unknown kind '{kind}'; use one of: {kinds}")
    try:
        args = KINDS.get(kind).check(kind, split_top_level(body))
    except ValueError as err:
        raise UsageError(f"--space '{text}': {kind}() {err}") from None
    return Param(key, kind, args, text.strip())


def parse_space(texts: list[str]) -> list[Param]:
    """Parse every ``--space`` option; at least one, each key once."""
    if not texts:
        raise UsageError("kdlab tune needs at least one --space 'key.sub=KIND(ARGS)'")
    params = [parse_param(t) for t in texts]
    seen: set[str] = set()
    for p in params:
        if p.key in seen:
            raise UsageError(f"--space names '{p.key}' twice")
        clash = next((s for s in seen if s.startswith(p.key + ".") or p.key.startswith(s + ".")), None)
        if clash:
            raise UsageError(f"--space names both '{clash}' and '{p.key}' (one lies inside the other)")
        seen.add(p.key)
    return params
