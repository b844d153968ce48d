"""Method registry: one class per method, looked up by name (``METHODS.get("kd")``).

Every module of this package is imported here so that its ``@METHODS.register`` decorators run.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from kdlab.methods.base import METHODS, Method, MethodParams

for _mod in _pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        _importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["METHODS", "Method", "MethodParams", "build_method"]


def build_method(name: str, params: dict) -> Method:
    """Instantiate the method ``name`` with validated ``params``."""
    cls = METHODS.get(name)
    return cls(cls.Params(**params))
