"""Method registry: one class per method, looked up by name (``METHODS.get("kd")``)."""

from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.methods import logit as _logit  # noqa: F401  (registers ce, kd, mse)  # isort: skip

__all__ = ["METHODS", "Method", "MethodParams", "build_method"]


def build_method(name: str, params: dict) -> Method:
    """Instantiate the method ``name`` with validated ``params``."""
    cls = METHODS.get(name)
    return cls(cls.Params(**params))
