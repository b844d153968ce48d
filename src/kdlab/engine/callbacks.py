"""Per-epoch hooks of the training loop.

A callback is registered by name in :data:`CALLBACKS` (instruments register theirs when :mod:`kdlab.instruments`
is imported) and enabled from the config with ``instruments: [name, ...]``. Whatever ``on_epoch_end`` returns is
merged into that epoch's row of ``metrics.jsonl``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdlab.registry import Registry

if TYPE_CHECKING:
    from kdlab.engine.trainer import Trainer


class Callback:
    """Base class: override what you need. One instance per run."""

    def setup(self, trainer: Trainer) -> None:
        """Called at the end of ``Trainer.__init__``, before anything is written: raise a KdlabError to refuse."""

    def on_train_start(self, trainer: Trainer) -> None:
        """Called once before the first epoch of this process (also after a resume)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> dict[str, Any]:
        """Called after each epoch's evaluation; returns extra metrics for the epoch's row."""
        return {}

    def on_epoch_row(self, trainer: Trainer, row: dict[str, Any]) -> None:
        """Called on rank 0 with the epoch's complete row, just after it is appended to ``metrics.jsonl``."""

    def on_checkpoint(self, trainer: Trainer, epoch: int) -> None:
        """Called on every rank once the epoch's checkpoint is on disk; an exception raised here stops the run where
        ``--resume`` continues it (kdlab tune's pruning, :mod:`kdlab.tune.worker`)."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Called once after the last epoch of this process."""


class _LazyRegistry(Registry[type[Callback]]):
    """Imports the optional instrument modules on first lookup so that they can register themselves."""

    _loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            try:
                importlib.import_module("kdlab.instruments")
            except ModuleNotFoundError as err:
                if err.name != "kdlab.instruments":
                    raise

    def get(self, name: str) -> type[Callback]:
        self._load()
        return super().get(name)

    def names(self) -> list[str]:
        self._load()
        return super().names()


CALLBACKS: Registry[type[Callback]] = _LazyRegistry("instrument")
