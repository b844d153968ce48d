"""A tiny name → object registry used for datasets, models and methods (no if/elif chains over names)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from kdlab.errors import ConfigError, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects; ``get`` raises a one-line error with a suggestion for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._families: list[tuple[re.Pattern[str], Callable[[re.Match[str]], T]]] = []

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self.register(name)(obj)

    def add_family(self, pattern: str, make: Callable[[re.Match[str]], T]) -> None:
        """Names matching the regular expression ``pattern`` (whole name) resolve to ``make(match)``; ``make`` raises
        ``ValueError`` for a match it cannot build (e.g. ``wrn_{depth}_{width}`` with an invalid depth)."""
        self._families.append((re.compile(pattern), make))

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        for pattern, make in self._families:
            match = pattern.fullmatch(name)
            if match is not None:
                try:
                    return make(match)
                except ValueError as err:
                    raise ConfigError(f"{self.kind} '{name}': {err}") from None
        raise unknown_name(self.kind, name, self._items) from None

    def __contains__(self, name: object) -> bool:
        if name in self._items:
            return True
        try:
            return isinstance(name, str) and bool(self._families) and self.get(name) is not None
        except ConfigError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)
