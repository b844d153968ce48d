"""WebDataset shards (``data.name: webdataset``): images streamed from tar files, read sequentially.

An export (``kdlab export-images SRC --format webdataset``, :func:`kdlab.data.export.export_webdataset`) is a folder
with ``train-NNNNNN.tar`` and ``val-NNNNNN.tar`` shards and ``dataset.json``. Each shard opens with a ``__kdlab__``
member (its export id, split, position and sample count; standard WebDataset readers skip ``__…__`` names), then one
sample per key: ``KEY.jpg`` / ``KEY.png`` (the image bytes) and ``KEY.cls`` (the class index as text). ``dataset.json``
records the classes (sorted folder names, as for image folders), and per split the shards in order with their
sample counts and labels, so that sizes and labels are known without reading a shard. A sample's index is its
position in that order (the key of a kdlab export is the same number), which is what augmentation, teacher caches,
CRD's memory and skipped-sample counts are keyed by.

Where the shards are: ``data.root: DIR`` (the export folder), or ``data.urls: {train: …, val: …}`` with lists,
brace patterns (``train-{000000..000099}.tar``), ``file:`` paths, ``http(s)://`` (read with curl) or ``pipe:COMMAND``
(a shell command writing the shard to stdout, e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``: it runs code,
so it needs ``--trust-code``), opened by the ``webdataset`` package (``webdataset.gopen``). The URLs of a split name
the export's shards in order; ``dataset.json`` comes from ``data.root`` (a folder or the file) or from beside the
first train shard. Local shards are read through :mod:`kdlab.fileio` (regular files, ``KDLAB_MAX_BYTES_ARCHIVE``).

One epoch reads every sample exactly once over all ranks and workers. The plan (:func:`rank_plan`) is a pure
function of ``(seed, epoch)``, the shard counts, the number of ranks and workers: the shards in a seeded order, cut
into one contiguous range per rank (as many samples as the rank's parts of the global batches) and per worker (as
many as its batches; worker ``w`` delivers steps ``w, w + W, …``, the DataLoader's round-robin), each worker passing
its range through a seeded shuffle buffer (``data.shuffle_buffer`` samples, kept encoded). A partly read shard is
skipped forward without decoding. Resume is exact at epoch boundaries (and within an epoch for the same number of
workers); a sample's augmentation is that of an image-folder sample (:mod:`kdlab.data.images`), a function of
``(seed, epoch, index)``. Evaluation reads the shards in order. Peak memory is the shuffle buffers and the batches in
flight, whatever the dataset size.

Damage is named: a shard that cannot be opened or read (corrupt, truncated, a failing URL), a shard of another export
or class count, a sample without a label or an image, a label differing from ``dataset.json`` — one line naming the
shard and the member, or, with ``data.skip_bad_images``, skipped (every sample it costs) and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from kdlab.data.augment import ImageAugment
from kdlab.data.base import DATASETS, Batch, DataSource, check_split
from kdlab.data.images import ImageViews, build_image_transform, build_image_views
from kdlab.data.stream import BadSample, StreamBase, View, worker_init
from kdlab.data.webdataset.export import (
    FORMAT,
    HEADER,
    META_FILE,
    SPLITS,
    Export,
    load_export,
)
from kdlab.data.webdataset.plan import Sequence, eval_plan, rank_plan
from kdlab.data.webdataset.reader import ShardReader
from kdlab.data.webdataset.workers import _as_is, _Pass, _PassDataset
from kdlab.errors import ConfigError, DataError
from kdlab.seeding import generator

if TYPE_CHECKING:
    from kdlab.config import DataConfig

__all__ = ["FORMAT", "HEADER", "META_FILE", "ShardDataset", "load_webdataset"]


class ShardDataset(StreamBase):
    """A WebDataset export behind the :class:`~kdlab.data.base.DataSource` interface (see the module docstring)."""

    def __init__(self, name: str, export: Export, views: dict[str, ImageViews], *, shuffle_buffer: int = 1000,
                 **kwargs: Any) -> None:  # fmt: skip
        self.export = export
        self.splits = {split: export.splits[SPLITS[split]] for split in ("train", "test")}
        self.views = views
        self.shuffle_buffer = shuffle_buffer
        labels = {split: torch.from_numpy(s.labels) for split, s in self.splits.items()}
        super().__init__(name, export.num_classes, labels=labels, **kwargs)

    def split_size(self, split: str) -> int:
        return self.splits[check_split(split)].count

    @property
    def sample_keys(self) -> str:
        """Which samples the indices name, recorded and checked by teacher caches: the export's id."""
        return f"webdataset export {self.export.export_id}"

    def take_first(self, train: int | None, test: int | None) -> ShardDataset:
        """Keep only the first ``train`` / ``test`` samples of each split (``None``: all)."""
        for split, n in (("train", train), ("test", test)):
            if n is not None:
                self.splits[split] = self.splits[split].take_first(n)
                self._labels[split] = self._labels[split][:n]
        if self._train_y is not None and train is not None:
            self._train_y = self._train_y[:train]
        return self

    def _reader(self, split: str, keep: np.ndarray | None = None, order: list[int] | None = None) -> ShardReader:
        seq = self._sequence(split, keep, order)
        return ShardReader(SPLITS[split], self.splits[split], self.export.export_id, self.num_classes, seq.kept)

    def _sequence(self, split: str, keep: np.ndarray | None, order: list[int] | None = None) -> Sequence:
        shards = self.splits[split]
        return Sequence.build(shards, order if order is not None else list(range(len(shards.shards))), keep)

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]:  # fmt: skip
        """One epoch: shards in a seeded order, this rank's range through a seeded shuffle buffer per worker.
        ``indices`` in ascending order read those samples in order (a teacher cache); in any other order, the
        subset is read in the epoch's shuffled order."""
        view: View = ("train", seed if augment_seed is None else augment_seed,
                      epoch if augment_epoch is None else augment_epoch)  # fmt: skip
        keep, in_order = None, False
        if indices is not None:
            idx = indices.detach().cpu().long().numpy()
            in_order = bool(len(idx) < 2 or (np.diff(idx) > 0).all())
            keep = idx if in_order else np.unique(idx)
        shards = self.splits["train"].shards
        if in_order:
            order, shuffle = list(range(len(shards))), None
        else:
            order = torch.randperm(len(shards), generator=generator(seed, "shards", epoch)).tolist()
            shuffle = self.shuffle_buffer
        seq = self._sequence("train", keep, order)
        plans = rank_plan(seq, batch_size, self.workers, start_batch=start_batch, shard=shard, shuffle=shuffle,
                          seed_key=(seed, epoch))  # fmt: skip
        reader = ShardReader("train", self.splits["train"], self.export.export_id, self.num_classes, seq.kept)
        w = max(1, self.workers)
        return self._run("train", _Pass(reader, plans, self.views["train"], self._views(view), start_batch % w), view)

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of ``split`` in order (or of the ascending ``indices`` of it), evaluation view."""
        keep = None
        if indices is not None:
            keep = indices.detach().cpu().long().numpy()
            if len(keep) > 1 and not (np.diff(keep) > 0).all():
                raise ConfigError("webdataset: evaluation reads shards in order; pass indices in ascending order")
        seq = self._sequence(split, keep)
        reader = ShardReader(SPLITS[split], self.splits[split], self.export.export_id, self.num_classes, seq.kept)
        return self._run(split, _Pass(reader, eval_plan(seq, batch_size, self.workers), self.views[split], (None,)),
                         None)  # fmt: skip

    def _run(self, split: str, run: _Pass, view: View) -> Iterator[Batch]:
        if self.workers == 0:
            return self._deliver(split, run.batches(0), view, release=False)
        loader = DataLoader(
            _PassDataset(run), batch_size=None, num_workers=self.workers, collate_fn=_as_is,
            pin_memory=self.device.type == "cuda", worker_init_fn=worker_init, prefetch_factor=self.prefetch,
            generator=torch.Generator().manual_seed(0),  # its seed draw must not advance the global torch RNG
        )  # fmt: skip
        return self._deliver(split, loader, view, release=True)

    def _first_samples(self, split: str, n: int) -> list[tuple[torch.Tensor, int]]:
        reader = self._reader(split)
        seq = self._sequence(split, None)
        out: list[tuple[torch.Tensor, int]] = []
        records = reader.records(seq.segments(0, seq.total))
        try:
            for rec in records:
                index, data, label, name = rec
                if data is not None:
                    try:
                        out.append((self.views[split].load(data, index, None, name), label))
                    except BadSample as err:
                        data, name = None, str(err)
                if data is None:
                    self._bad(split, [(index, name)])
                if len(out) == n:
                    break
        finally:
            records.close()  # type: ignore[attr-defined]
        if not out:
            raise DataError(f"{self.name}: no {split} sample could be loaded")
        return out


def load_webdataset(cfg: DataConfig) -> DataSource:
    """``data.name: webdataset``: the export at ``data.root`` / ``data.urls`` (see the module docstring)."""
    export = load_export(cfg)
    name = cfg.transform or export.transform or "imagenet"  # the export's own (cifar for CIFAR) unless set
    transform = build_image_transform(name, cfg.image_size, cfg.mean, cfg.std)
    norm = ImageAugment(transform.mean, transform.std, num_samples=0, enabled=False)
    views = {"train": build_image_views(cfg, transform, cfg.augment), "test": build_image_views(cfg, transform)}
    return ShardDataset(
        "webdataset", export, views, shuffle_buffer=cfg.shuffle_buffer, input_shape=(3, transform.size, transform.size),
        finish=norm.eval_batch, workers=cfg.workers, prefetch=cfg.prefetch, skip_bad=cfg.skip_bad_images,
    )  # fmt: skip


@DATASETS.register("webdataset")
def _build_webdataset(cfg: DataConfig) -> DataSource:
    return load_webdataset(cfg)
