"""A user's own dataset from YAML: ``data.name: package.module:function`` or ``path/to/file.py:function``.

The function receives the :class:`~kdlab.config.DataConfig` and returns a mapping with ``train`` and ``test`` — each
a pair of tensors ``(x, y)`` or a ``torch.utils.data.Dataset`` yielding ``(x, y)`` — and ``num_classes``. A builder
function is not an ``nn.Module``, so it runs only with ``--trust-code`` (:mod:`kdlab.trust`).

Two tensor pairs become a resident :class:`~kdlab.data.base.Dataset` (kept on the training device); a ``Dataset``
split is streamed through DataLoader workers (``data.workers``). What the builder returns is checked, never
repaired: labels are integer class indices (a float label 2.5 is refused, not truncated), one per sample (1-D), in
``[0, num_classes)``; inputs are finite and all of one shape. Tensor pairs are checked once when the data is built,
``Dataset`` samples as each one is loaded (a bad one stops the run naming its split and index, or is skipped and
counted with ``data.skip_bad_images``). Inputs are used as given (already model inputs, no
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


#: rows per chunk of the finiteness check of resident features (bounds its temporary memory to ~64 MiB of flags)
_CHECK_ELEMENTS = 1 << 26


def _nonfinite(x: torch.Tensor) -> str:
    """``"nan"``, ``"inf"`` or ``"-inf"``: the first non-finite value of ``x`` (which has one), for messages."""
    v = float(x.reshape(-1)[~torch.isfinite(x.reshape(-1))][0])
    return str(v)


def check_features(x: torch.Tensor, where: str, first: int = 0) -> None:
    """Every input of ``x`` (samples along dim 0, numbered from ``first``) is a finite real number; else a one-line
    :class:`DataError` naming the first bad sample (a NaN input is the data's fault, not the loss's)."""
    if x.is_complex():
        raise DataError(f"{where}: inputs must be real numbers, got dtype {x.dtype}")
    if not x.is_floating_point() or len(x) == 0:
        return  # integers and booleans are always finite
    rows = max(1, _CHECK_ELEMENTS // max(1, x[0].numel()))
    for start in range(0, len(x), rows):
        part = x[start : start + rows]
        bad = ~torch.isfinite(part.reshape(len(part), -1)).all(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DataError(f"{where} sample {first + start + i}: input is not finite ({_nonfinite(part[i])}); "
                            "kdlab trains and evaluates on finite inputs only")  # fmt: skip


def check_labels(y: torch.Tensor, num_classes: int, where: str) -> torch.Tensor:
    """``y`` as int64 class indices if it is 1-D, integer-valued and within ``[0, num_classes)``; else a one-line
    :class:`DataError` naming the first bad sample. Float labels are never rounded or truncated."""
    if y.dim() != 1:
        raise DataError(f"{where}: labels must be 1-D (one class index per sample), got shape {tuple(y.shape)}")
    if y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{where}: labels must be integer class indices, got dtype {y.dtype}")
    if y.is_floating_point():
        bad = ~(torch.isfinite(y) & (y == torch.floor(y)))
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise DataError(f"{where} sample {i}: label {float(y[i]):.6g} is not an integer class index "
                            "(kdlab does not round labels)")  # fmt: skip
    outside = (y < 0) | (y >= num_classes)
    if bool(outside.any()):
        i = int(outside.nonzero()[0])
        value = int(y[i]) if not y.is_floating_point() else float(y[i])
        raise DataError(f"{where} sample {i}: label {value} is outside [0, {num_classes})")
    return y.long()


def _label(y: Any, num_classes: int) -> int:
    """One sample's label as an int; raises ``ValueError`` with the reason (a vector, a fraction, out of range)."""
    try:
        t = torch.as_tensor(y)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"label {y!r} is not a class index") from None
    if t.dim() != 0:
        raise ValueError(f"label has shape {tuple(t.shape)}, expected a single class index")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"label {t.item()!r} is a {t.dtype}, not an integer class index")
    if t.is_floating_point() and not (bool(torch.isfinite(t)) and float(t) == float(torch.floor(t))):
        raise ValueError(f"label {float(t):.6g} is not an integer class index (kdlab does not round labels)")
    value = int(t)
    if not 0 <= value < num_classes:
        raise ValueError(f"label {value} is outside [0, {num_classes})")
    return value


class TorchItems:
    """A split given as a ``torch.utils.data.Dataset`` (or a tensor pair) yielding ``(x, y)``, checked sample by
    sample where it is loaded (in a DataLoader worker): the input has the shape of the first training sample (``shape``,
    set once that is known) and is finite, the label is one integer class index in ``[0, num_classes)``."""

    def __init__(self, data: Any, where: str, num_classes: int) -> None:
        self.data, self.where, self.num_classes = data, where, num_classes
        self.shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        try:
            x, y = self.data[index]
            x = torch.as_tensor(x)
        except Exception as err:
            raise BadSample(f"{self.where} sample {index}: {type(err).__name__}: {err}") from None
        try:
            label = _label(y, self.num_classes)
        except ValueError as err:
            raise BadSample(f"{self.where} sample {index}: {err}") from None
        if self.shape is not None and tuple(x.shape) != self.shape:
            raise BadSample(f"{self.where} sample {index}: input shape {tuple(x.shape)} differs from "
                            f"{self.shape} (the first training sample); every input must have the same shape")  # fmt: skip
        try:
            check_features(x.unsqueeze(0), self.where, first=index)
        except DataError as err:
            raise BadSample(str(err)) from None
        return x, label


def _split(value: Any, where: str, num_classes: int) -> Split | TorchItems:
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value):
        x, y = value
        if len(x) != len(y):
            raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
        if len(x) == 0:
            raise DataError(f"{where} is empty")
        y = check_labels(y, num_classes, where)
        check_features(x, where)  # resident data: checked once, here
        return Split(x, y)
    if isinstance(value, TorchDataset) or (hasattr(value, "__getitem__") and hasattr(value, "__len__")):
        if len(value) == 0:
            raise DataError(f"{where} is empty")
        return TorchItems(value, where, num_classes)
    raise DataError(f"{where} must be a pair of tensors (x, y) or a torch Dataset yielding (x, y), "
                    f"got {type(value).__name__}")  # fmt: skip


def build_user_dataset(cfg: DataConfig, builder: Any) -> DataSource:
    """Call the user's builder (trust-checked) and wrap what it returns, its labels and inputs checked: tensor pairs
    once here, ``Dataset`` samples as they are loaded."""
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
    train, test = (_split(out[s], f"{name} {s} split", k) for s in ("train", "test"))
    if isinstance(train, Split) and isinstance(test, Split):
        if train.x.shape[1:] != test.x.shape[1:]:
            raise DataError(f"{name}: test inputs have shape {tuple(test.x.shape[1:])}, training inputs "
                            f"{tuple(train.x.shape[1:])}")  # fmt: skip
        return Dataset(name, train, test, k, PlainTransform())
    sources = {s: part if isinstance(part, TorchItems) else TorchItems(_Pairs(part.x, part.y), f"{name} {s} split", k)
               for s, part in (("train", train), ("test", test))}  # a tensor pair next to a Dataset: sample by sample
    x0 = _first_input(sources["train"], cfg.skip_bad_images)
    for source in sources.values():
        source.shape = tuple(x0.shape)  # before any worker starts: every sample is compared with it
    return StreamingDataset(name, sources, k, input_shape=tuple(x0.shape), finish=lambda x: x,  # type: ignore[arg-type]
                            workers=cfg.workers, prefetch=cfg.prefetch, skip_bad=cfg.skip_bad_images,
                            has_strong_view=False)  # fmt: skip


def _first_input(source: TorchItems, skip_bad: bool) -> torch.Tensor:
    """The input of the first training sample that loads (sample 0 unless ``skip_bad`` lets bad ones be skipped): it
    fixes the input shape every other sample is held to."""
    for i in range(len(source)):
        try:
            return source.load(i, None)[0]
        except BadSample as err:
            if not skip_bad:
                raise DataError(str(err)) from None
    raise DataError(f"{source.where}: no sample could be loaded")


class _Pairs:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
