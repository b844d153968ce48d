"""kdlab: knowledge distillation of classifiers (``kdlab --help`` for the command line).

The public Python entry point for a training loop of your own is :class:`kdlab.Distiller` (imported on first use,
so ``import kdlab`` stays light).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdlab.distiller import DistillStep, Distiller

__all__ = ["DistillStep", "Distiller"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdlab import distiller

        return getattr(distiller, name)
    raise AttributeError(f"module 'kdlab' has no attribute '{name}'")
