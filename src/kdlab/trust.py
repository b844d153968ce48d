"""Code trust: what a config may make kdlab import and call.

A config names user code by an import path, ``package.module:Name`` or ``path/to/file.py:Name`` (``model.name``,
``teacher.name``, ``data.name``). The policy, like other toolkits' "trust remote code":

* a name that resolves to a class of an allowed kind (an ``nn.Module`` subclass for models) is built without asking;
* any other callable (a factory such as ``timm:create_model``, a dataset-builder function, ``subprocess:Popen``) is
  called only when the user passed ``--trust-code`` (or set ``KDLAB_TRUST_CODE=1``), and every such name is recorded
  in the run (``summary.json`` → ``trusted_code``).

The check happens when the name is resolved (which is when a config is validated), before anything is called::

    from kdlab.trust import import_object, require_trusted

    obj = import_object("mypkg.data:build", what="data.name")        # imports, calls nothing
    require_trusted("mypkg.data:build", obj, what="data.name")       # raises UntrustedCodeError unless trusted
    require_trusted("mypkg.nets:Net", cls, what="model.name", allowed=nn.Module)  # a Module subclass passes
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from kdlab.errors import ConfigError

TRUST_ENV = "KDLAB_TRUST_CODE"
_FLAG = "--trust-code"

_state: dict[str, bool | None] = {"trust": None}  # None: follow the environment variable
_trusted_names: set[str] = set()


class UntrustedCodeError(ConfigError):
    """A config names a callable that kdlab may only call with ``--trust-code``."""


def trust_enabled() -> bool:
    """Whether arbitrary callables named in configs may be called (``--trust-code`` or ``KDLAB_TRUST_CODE=1``)."""
    flag = _state["trust"]
    if flag is not None:
        return flag
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_trust(enabled: bool | None) -> None:
    """Set trust for this process (``None``: follow ``KDLAB_TRUST_CODE``). The CLI calls it for ``--trust-code``."""
    _state["trust"] = enabled


def trust_from_cli(flag: bool) -> None:
    """Trust for this process as the command line says (without ``--trust-code``: as ``KDLAB_TRUST_CODE`` says)."""
    set_trust(True if flag else None)


def child_env() -> dict[str, str]:
    """Environment entries that pass this process's trust on to worker processes (sweep/chain jobs)."""
    return {TRUST_ENV: "1"} if trust_enabled() else {}


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--trust-code`` flag (every ``kdlab`` command has it)."""
    parser.add_argument(
        _FLAG, action="store_true", dest="trust_code",
        help=f"allow configs to call code other than nn.Module classes (factories, dataset builders); also {TRUST_ENV}=1",
    )  # fmt: skip


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Temporarily trust (or distrust) code named in configs, e.g. for a pipeline worker or a test."""
    before = _state["trust"]
    _state["trust"] = enabled
    try:
        yield
    finally:
        _state["trust"] = before


def trusted_among(names: Iterable[str | None]) -> list[str]:
    """Those of ``names`` (a run's model, teacher and data names) that were allowed only by ``--trust-code``: what
    the run records in its summary as ``trusted_code``."""
    return [n for n in dict.fromkeys(names) if n is not None and n in _trusted_names]


def is_import_path(name: str) -> bool:
    """``module.path:Name`` or ``path/to/file.py:Name`` (kdlab's own registry names contain no colon)."""
    return ":" in name


def _load_file_module(path: Path, what: str) -> object:
    resolved = path.resolve()
    mod_name = f"kdlab_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{what}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[mod_name]
        raise ConfigError(f"{what}: importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def import_object(name: str, *, what: str) -> object:
    """The object named by ``module.path:Attr`` or ``file.py:Attr`` — imported, never called.

    ``what`` names the config key for the one-line :class:`~kdlab.errors.ConfigError` (e.g. ``"model.name"``).
    """
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"{what} '{name}' must look like package.module:Name or path/to/file.py:Name")
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise ConfigError(f"{what} '{name}': file not found: {where}")
        obj = _load_file_module(path, what)
    else:
        try:
            obj = importlib.import_module(where)
        except ImportError as err:
            raise ConfigError(f"{what} '{name}': cannot import '{where}': {err}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{what} '{name}': '{where}' has no attribute '{attr}'")
    return obj


def require_trusted(name: str, obj: object, *, what: str, allowed: type | tuple[type, ...] = ()) -> None:
    """Allow calling ``obj`` (named ``name`` by the config key ``what``) or raise :class:`UntrustedCodeError`.

    A class that is a subclass of ``allowed`` passes without trust; anything else callable needs trust and is then
    recorded (:func:`trusted_among`). Something not callable at all is a plain :class:`~kdlab.errors.ConfigError`.
    """
    if allowed and isinstance(obj, type) and issubclass(obj, allowed):
        return
    if not callable(obj):
        raise ConfigError(f"{what} '{name}' is a {type(obj).__name__}, not something kdlab can call")
    if not trust_enabled():
        kinds = allowed if isinstance(allowed, tuple) else (allowed,)
        kind = " or ".join(("nn." if k.__module__.startswith("torch.nn") else "") + k.__name__ for k in kinds)
        isnt = f", not a subclass of {kind}" if kind else ""
        raise UntrustedCodeError(
            f"{what} '{name}' is a {type(obj).__name__}{isnt}; kdlab calls such code named in a config only with "
            f"{_FLAG} (or {TRUST_ENV}=1)"
        )
    _trusted_names.add(name)
