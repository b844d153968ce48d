"""A user's own dataset from YAML: ``data.name: package.module:function`` or ``path/to/file.py:function``.

The function receives the :class:`~kdlab.config.DataConfig` and returns a mapping with ``train`` and ``test`` — each
a pair of tensors ``(x, y)`` or a ``torch.utils.data.Dataset`` yielding ``(x, y)`` — and ``num_classes``. A builder
function is not an ``nn.Module``, so it runs only with ``--trust-code`` (:mod:`kdlab.trust`).

Two tensor pairs become a resident :class:`~kdlab.data.base.Dataset` (kept on the training device); a ``Dataset``
split is streamed through DataLoader workers (``data.workers``). Inputs are used as given (already model inputs, no
augmentation by kdlab); a ``Dataset`` that augments itself should draw from a generator keyed by the index, or
``--resume`` is no longer bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset as TorchDataset

from kdlab.data.base import DataSource, Dataset, Split
from kdlab.data.stream import BadSample, StreamingDataset, View
from kdlab.errors import DataError, KdlabError
from kdlab.trust import require_trusted

if TYPE_CHECKING:
    from kdlab.config import DataConfig


class PlainTransform:
    """User tensors are model inputs already: no augmentation, no normalisation (no strong view)."""

    def train_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return x

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TorchItems:
    """A split given as a ``torch.utils.data.Dataset`` (or a tensor pair) yielding ``(x, y)``."""

    def __init__(self, data: Any, where: str) -> None:
        self.data, self.where = data, where

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        try:
            x, y = self.data[index]
            return torch.as_tensor(x), int(y)
        except Exception as err:
            raise BadSample(f"{self.where} sample {index}: {type(err).__name__}: {err}") from None


def _split(value: Any, where: str) -> Split | TorchItems:
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        return Split(value[0], value[1])
    if isinstance(value, TorchDataset) or (hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        if len(value) == 0:
            raise DataError(f"{where} is empty")
        return TorchItems(value, where)
    raise DataError(f"{where} must be a pair of tensors (x, y) or a torch Dataset yielding (x, y), "
                    f"got {type(value).__name__}")  # fmt: skip


def build_user_dataset(cfg: DataConfig, builder: Any) -> DataSource:
    """Call the user's builder (trust-checked) and wrap what it returns."""
    name = cfg.name
    require_trusted(name, builder, what="data.name")
    try:
        out = builder(cfg)
    except KdlabError:
        raise
    except Exception as err:
        raise DataError(f"data.name '{name}' failed: {type(err).__name__}: {err}") from None
    if not isinstance(out, Mapping) or not {"train", "test", "num_classes"} <= set(out):
        raise DataError(f"data.name '{name}' must return a mapping with train, test and num_classes")
    k = out["num_classes"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise DataError(f"data.name '{name}': num_classes must be an integer ≥ 2, got {k!r}")
    train, test = _split(out["train"], f"{name} train"), _split(out["test"], f"{name} test")
    if isinstance(train, Split) and isinstance(test, Split):
        return Dataset(name, train, test, k, PlainTransform())
    sources = {s: part if isinstance(part, TorchItems) else TorchItems(_Pairs(part.x, part.y), f"{name} {s}")
               for s, part in (("train", train), ("test", test))}  # a tensor pair next to a Dataset: sample by sample
    x0, _ = sources["train"].load(0, None)
    return StreamingDataset(name, sources, k, input_shape=tuple(x0.shape), finish=lambda x: x,  # type: ignore[arg-type]
                            workers=cfg.workers, prefetch=cfg.prefetch, has_strong_view=False)  # fmt: skip


class _Pairs:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
