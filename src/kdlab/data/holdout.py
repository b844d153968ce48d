"""A validation split held out of the training set (``data.val_split``), for any data source.

:class:`HeldOut` wraps a :class:`~kdlab.data.base.DataSource` — resident or streamed, the wrapper never asks which —
and presents three splits: ``train`` (the samples kept for training, renumbered ``0 … n_train − 1``), ``val`` (the
held-out samples, renumbered ``0 … n_val − 1``, read with the evaluation view) and ``test`` (the source's own). Which
samples are held out is a pure function of ``(number of training samples, val_split, val_seed)``
(:func:`holdout_indices`), independent of the run seed, so every seed of a sweep and every trial of a search sees the
same split; :func:`split_record` is what a run records of it (sizes and a digest of the held-out indices).

Batches are drawn from the wrapped source by index subset (its ``indices`` argument): the shuffle of an epoch is a
permutation of the kept samples keyed by ``(seed, epoch)``, while the augmentation stays keyed by each sample's index
in the source, and the indices a batch carries are the renumbered ones (what a teacher cache, CRD's memory and the
instruments line up with). With ``read_test=False`` every read of the test split (batches, labels, examples) raises:
a tuning trial cannot look at it by accident.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kdlab.data.base import Batch, DataSource
from kdlab.data.loader import epoch_order
from kdlab.errors import ConfigError, DataError
from kdlab.seeding import generator

HELD_OUT_SPLITS = ("train", "val", "test")


def val_count(n: int, val_split: float) -> int:
    """How many of ``n`` training samples a ``data.val_split`` value holds out (a fraction, or a count when ≥ 1)."""
    k = int(val_split) if val_split >= 1 else round(n * val_split)
    if k < 1 or k >= n:
        raise ConfigError(f"data.val_split={val_split:g} holds out {k} of the {n} training samples; at least one "
                          "must be held out and at least one kept for training")  # fmt: skip
    return k


def holdout_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)``: sorted, disjoint source indices covering ``0 … n − 1``; a pure function of the arguments."""
    k = val_count(n, val_split)
    perm = torch.randperm(n, generator=generator(seed, "val_split"))
    return perm[k:].sort().values, perm[:k].sort().values


def split_record(train: torch.Tensor, val: torch.Tensor, val_split: float, seed: int) -> dict[str, Any]:
    """What a run records of its val split: the setting, both sizes and the SHA-256 of the held-out indices."""
    digest = hashlib.sha256(val.to(torch.int64).cpu().numpy().tobytes()).hexdigest()
    return {"val_split": val_split, "val_seed": seed, "num_train": len(train), "num_val": len(val),
            "val_indices_sha256": digest}  # fmt: skip


class HeldOut:
    """``source`` with ``val_split`` of its training samples held out as the ``val`` split (see the module doc)."""

    def __init__(self, source: DataSource, val_split: float, seed: int, *, read_test: bool = True) -> None:
        self.source = source
        self.name = source.name
        self.num_classes = source.num_classes
        self.read_test = read_test
        self.noisy_indices: torch.Tensor | None = None
        self.clean_train_y: torch.Tensor | None = None
        self.train_idx, self.val_idx = holdout_indices(source.num_train, val_split, seed)
        self.record = split_record(self.train_idx, self.val_idx, val_split, seed)
        # source index -> index within its own split (train and val are disjoint, so one table serves both)
        self._pos = torch.empty(source.num_train, dtype=torch.long)
        self._pos[self.train_idx] = torch.arange(len(self.train_idx))
        self._pos[self.val_idx] = torch.arange(len(self.val_idx))
        self._train_on_device = self.train_idx  # for strong views of device-resident batches
        self._labels: dict[str, torch.Tensor] = {}
        self._train_y: torch.Tensor | None = None  # label override of the kept samples (label noise)

    # ---- sizes and labels -----------------------------------------------------------------------------------------

    @property
    def num_train(self) -> int:
        return len(self.train_idx)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.source.input_shape

    def _subset(self, split: str) -> torch.Tensor | None:
        """Source training indices of ``split`` (``None`` for the test split, which is the source's own)."""
        if split == "train":
            return self.train_idx
        if split == "val":
            return self.val_idx
        if split == "test":
            if not self.read_test:
                raise DataError("this run does not read the test split (data.read_test=false: a tuning trial is "
                                "measured on the val split); once the search is over, data.read_test=true reads it")  # fmt: skip
            return None
        raise ConfigError(f"split must be one of {', '.join(HELD_OUT_SPLITS)}, got '{split}'")

    def split_size(self, split: str) -> int:
        if split == "test":  # a size reads no sample: allowed even when the test split is closed
            return self.source.split_size("test")
        sub = self._subset(split)
        assert sub is not None
        return len(sub)

    def labels(self, split: str) -> torch.Tensor:
        sub = self._subset(split)
        if sub is None:
            return self.source.labels("test")
        if split == "train" and self._train_y is not None:
            return self._train_y
        if split not in self._labels:
            all_y = self.source.labels("train")
            self._labels[split] = all_y[sub.to(all_y.device)]
        return self._labels[split]

    def set_train_labels(self, y: torch.Tensor) -> None:
        if len(y) != self.num_train:
            raise DataError(f"{self.name}: {len(y)} labels for {self.num_train} training samples")
        self._train_y = y.long().to(self._pos.device)

    # ---- batches --------------------------------------------------------------------------------------------------

    def _local(self, batches: Iterator[Batch], relabel: bool) -> Iterator[Batch]:
        """Source batches with their indices renumbered within the split (and the training-label override)."""
        for x, y, idx in batches:
            local = self._pos[idx]
            if relabel and self._train_y is not None:
                y = self._train_y[local]
            yield x, y, local

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]:  # fmt: skip
        """Training batches of the kept samples: shuffled by ``(seed, epoch)`` among themselves (or ``indices`` of
        them, in that order), augmented as the source augments them."""
        local = epoch_order(self.num_train, seed, epoch) if indices is None else indices.cpu()
        it = self.source.train_batches(batch_size, seed=seed, epoch=epoch, start_batch=start_batch,
                                       indices=self.train_idx[local], shard=shard, augment_seed=augment_seed,
                                       augment_epoch=augment_epoch)  # fmt: skip
        return self._local(it, relabel=True)

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of ``split`` in order (or of ``indices`` of it), evaluation view."""
        sub = self._subset(split)
        if sub is None:
            return self.source.eval_batches("test", batch_size, indices)
        chosen = sub if indices is None else sub[indices.cpu()]
        return self._local(self.source.eval_batches("train", batch_size, chosen), relabel=split == "train")

    def example_batch(self, n: int = 2, split: str = "train") -> torch.Tensor:
        """Example inputs (shapes, compile and fold checks): the source's first training samples for train and val."""
        return self.source.example_batch(n, "test" if self._subset(split) is None else "train")

    def strong_batch(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        return self.source.strong_batch(self._train_on_device[index], seed, epoch)

    def prepare_views(self, views: int) -> None:
        """Streamed sources render two-view methods' strong view in their workers (kdlab.data.stream)."""
        prepare = getattr(self.source, "prepare_views", None)
        if prepare is not None:
            prepare(views)

    def take_first(self, train: int | None, test: int | None) -> HeldOut:
        """Keep the first ``train`` kept samples (the val split stays whole) and the first ``test`` test samples."""
        if train is not None:
            self.train_idx = self.train_idx[:train]
            self._train_on_device = self._train_on_device[:train]
            self._labels.pop("train", None)
            if self._train_y is not None:
                self._train_y = self._train_y[:train]
        if test is not None:
            self.source = self.source.take_first(None, test)
        return self

    def to(self, device: torch.device | str) -> HeldOut:
        """Move the source to ``device``; the index tables follow (the batches it yields carry indices there)."""
        self.source = self.source.to(device)
        self._pos = self._pos.to(device)
        self._train_on_device = self.train_idx.to(device)
        if self._train_y is not None:
            self._train_y = self._train_y.to(device)
        return self

    @property
    def skipped(self) -> dict[tuple[str, int], str] | None:
        """Unreadable samples a streamed source skipped, keyed by ``(split, index within the split)``."""
        seen = getattr(self.source, "skipped", None)
        if seen is None:
            return None
        is_val = torch.zeros(self.source.num_train, dtype=torch.bool)
        is_val[self.val_idx] = True
        pos = self._pos.cpu()
        out = {}
        for (split, i), why in seen.items():
            if split == "train":
                split = "val" if bool(is_val[i]) else "train"
                i = int(pos[i])
            out[(split, i)] = why
        return out

