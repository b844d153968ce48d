"""Streaming data: samples decoded in DataLoader worker processes, batches of ``(x, y, index)`` like resident data.

Two kinds share the delivery (:class:`StreamBase`): :class:`StreamingDataset` holds per split an item source with
random access (:class:`ItemSource`: an image folder, a user's ``torch.utils.data.Dataset``), and
:class:`kdlab.data.webdataset.ShardDataset` reads tar shards sequentially. For item sources the batch plan —
shuffle order, subset, shard across ranks — is the same function as for resident data
(:func:`kdlab.data.loader.batch_plan`); it runs in the main process, and each request sent to a worker carries
``(split, index, views)`` with each view's ``(kind, augment seed, epoch)``, so a sample's augmentation never depends on
which worker decodes it, on the number of workers or on an interruption. One DataLoader per dataset serves every
split (persistent workers, prefetch, pinned memory on CUDA).

Batches travel as uint8, channels-last (N×C×H×W with H×W×C memory, collated straight into shared memory): a quarter
of the bytes of float32, and no layout change before a channels-last model. Normalisation (``finish``) runs on the
training device. Two-view methods (MLKD) have the workers render the strong view of each sample beside the training
view (:meth:`StreamBase.prepare_views`); without it the strong view is rendered in the main process on request.

A sample that cannot be loaded (a corrupt or truncated image) stops the run with a one-line
:class:`~kdlab.errors.DataError` naming it, or, with ``data.skip_bad_images``, is left out of its batch and counted
(:attr:`StreamBase.skipped`, one warning per sample on stderr) — in workers and in the main process alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from kdlab.data.base import Batch, check_split
from kdlab.data.loader import batch_plan
from kdlab.errors import ConfigError, DataError

View = tuple[str, int, int] | None  # (kind "train" | "strong", augment seed, epoch); None: evaluation
Request = tuple[str, int, tuple[View, ...]]
Item = tuple[tuple[torch.Tensor, ...] | None, int, int, str | None]  # (views, label, index, why it failed)


class BadSample(Exception):
    """A sample that could not be loaded; ``str()`` names it and the reason."""


class ItemSource(Protocol):
    """One split of a streamed dataset, loadable one sample at a time (in a worker process)."""

    def __len__(self) -> int: ...

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        """Sample ``index`` under ``view`` as ``(input tensor, label)``; raises :class:`BadSample`."""
        ...


class _Head:
    """The first ``n`` samples of an item source."""

    def __init__(self, source: ItemSource, n: int) -> None:
        self.source, self.n = source, min(n, len(source))

    def __len__(self) -> int:
        return self.n

    def load(self, index: int, view: View) -> tuple[torch.Tensor, int]:
        return self.source.load(index, view)


class _Requests:
    """The DataLoader's batch sampler: the current plan's batches of requests (set before each pass)."""

    def __init__(self) -> None:
        self.plan: Iterable[list[Request]] = ()

    def __iter__(self) -> Iterator[list[Request]]:
        return iter(self.plan)


def load_views(source: ItemSource, index: int, views: tuple[View, ...]) -> Item:
    """Sample ``index`` under each of ``views`` (a failure reported, not raised)."""
    try:
        xs, label = [], -1
        for view in views:
            x, label = source.load(index, view)
            xs.append(x)
    except BadSample as err:
        return None, -1, index, str(err)
    return tuple(xs), int(label), index, None


class _Worker(TorchDataset):
    """Worker-side view of all splits: loads one request, reporting a failure instead of raising it."""

    def __init__(self, sources: dict[str, ItemSource]) -> None:
        self.sources = sources

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources.values())

    def __getitem__(self, req: Request) -> Item:
        split, index, views = req
        return load_views(self.sources[split], index, views)


def stack_inputs(xs: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample inputs into one batch, in shared memory when called in a worker (no copy when it is sent).
    C×H×W views of H×W×C memory (rendered images) stack into an N×H×W×C buffer returned as a channels-last
    N×C×H×W tensor; anything else stacks as it is."""
    first = xs[0]
    hwc = first.dim() == 3 and all(x.permute(1, 2, 0).is_contiguous() for x in xs)
    parts = [x.permute(1, 2, 0) for x in xs] if hwc else xs
    shape = (len(parts), *parts[0].shape)
    out = None
    if torch.utils.data.get_worker_info() is not None:  # as torch's default_collate: straight into shared memory
        numel = len(parts) * parts[0].numel()
        storage = first.untyped_storage()._new_shared(numel * first.element_size(), device=first.device)
        out = first.new_empty(0).set_(storage, 0, shape)
    stacked = torch.stack(parts, 0, out=out)
    return stacked.permute(0, 3, 1, 2) if hwc else stacked


def collate(items: list[Item]) -> tuple[Any, ...]:
    """``(x, y, index, bad, strong)`` of a batch of loaded items; ``x`` is ``None`` when none loaded, ``strong`` when
    the items carry no second view."""
    good = [it for it in items if it[3] is None]
    bad = [(it[2], it[3]) for it in items if it[3] is not None]
    if not good:
        return None, None, None, bad, None
    x = stack_inputs([it[0][0] for it in good])  # type: ignore[index]
    strong = stack_inputs([it[0][1] for it in good]) if len(good[0][0]) > 1 else None  # type: ignore[arg-type]
    return x, torch.tensor([it[1] for it in good]), torch.tensor([it[2] for it in good]), bad, strong


def worker_init(_worker_id: int) -> None:
    """Close the run-folder lock descriptors a forked worker inherited (``engine/rundir.py``): a worker outliving a
    SIGKILLed run for a few seconds must not keep the folder locked against ``--resume``."""
    from kdlab.engine.rundir import LOCK_FILES

    fd_dir = "/proc/self/fd"
    if not os.path.isdir(fd_dir):
        return  # not Linux: workers are spawned and inherit nothing
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except OSError:
            continue
        if os.path.basename(target) in LOCK_FILES:
            os.close(int(name))


def _release_received() -> None:
    """Unmap the shared-memory batches already received from workers and dropped. torch keeps up to 128 of them
    mapped (``torch.multiprocessing.reductions.shared_cache``), which at ImageNet batch sizes is gigabytes of RSS."""
    from torch.multiprocessing import reductions

    cache = getattr(reductions, "shared_cache", None)
    if cache is not None:
        cache.free_dead_references()


class StreamBase:
    """What every streamed source shares: sizes, labels, device, skipping, and the delivery of worker batches.

    ``finish`` turns a batch as loaded (on the device) into model inputs (e.g. uint8 → normalised float).
    ``labels`` gives each split's labels when they are known without loading samples (image folders, shards).
    Subclasses provide the split sizes (:meth:`split_size`), the batches (``train_batches`` / ``eval_batches``) and
    the samples read in the main process (:meth:`_first_samples`, :meth:`_strong_here`).
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        *,
        input_shape: tuple[int, ...],
        finish: Callable[[torch.Tensor], torch.Tensor],
        labels: dict[str, torch.Tensor] | None = None,
        workers: int = 2,
        prefetch: int = 2,
        skip_bad: bool = False,
        has_strong_view: bool = True,
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self._input_shape = tuple(input_shape)
        self.finish = finish
        self._labels = dict(labels or {})
        self.workers, self.prefetch, self.skip_bad = workers, prefetch, skip_bad
        self.has_strong_view = has_strong_view
        self.noisy_indices: torch.Tensor | None = None
        self.clean_train_y: torch.Tensor | None = None
        self._train_y: torch.Tensor | None = None  # label override (label noise)
        self.device = torch.device("cpu")
        self.skipped: dict[tuple[str, int], str] = {}
        self.views_per_sample = 1
        self._strong: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None  # (seed, epoch), idx, views
        self._pass = 0  # which pass owns the loader (a pass is abandoned when another one starts)

    # ---- sizes and labels -----------------------------------------------------------------------------------------

    def split_size(self, split: str) -> int:
        raise NotImplementedError

    @property
    def num_train(self) -> int:
        return self.split_size("train")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    def labels(self, split: str) -> torch.Tensor:
        check_split(split)
        if split == "train" and self._train_y is not None:
            return self._train_y
        return self._labels[split]

    def set_train_labels(self, y: torch.Tensor) -> None:
        if len(y) != self.num_train:
            raise DataError(f"{self.name}: {len(y)} labels for {self.num_train} training samples")
        self._train_y = y.long().cpu()

    def to(self, device: torch.device | str) -> StreamBase:
        """Deliver batches on ``device`` (pinned host memory and non-blocking copies on CUDA)."""
        device = torch.device(device)
        if device.type != self.device.type:
            self._close()
        self.device = device
        return self

    def prepare_views(self, views: int) -> None:
        """Have the workers render ``views`` views of each training sample (2: the strong view of two-view methods
        beside the training view, served by :meth:`strong_batch` for the batch just delivered)."""
        if views > 1 and not self.has_strong_view:
            raise ConfigError(f"dataset '{self.name}' has no strong view for two-view methods")
        self.views_per_sample = views
        self._close()

    # ---- samples read in this process -----------------------------------------------------------------------------

    def example_batch(self, n: int = 2, split: str = "train") -> torch.Tensor:
        """The first ``n`` samples of ``split`` that load, as model inputs (evaluation view, loaded in this process;
        with ``data.skip_bad_images`` a bad one is skipped and counted here too)."""
        xs = [x for x, _ in self._first_samples(split, n)]
        return self.finish(stack_inputs(xs).to(self.device))

    def strong_batch(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """The strongly augmented second view of training samples ``index``: the one the workers rendered with the
        batch just delivered, else rendered in this process."""
        if not self.has_strong_view:
            raise ConfigError(f"dataset '{self.name}' has no strong view for two-view methods")
        if self._strong is not None:
            key, idx, views = self._strong
            if key == (seed, epoch) and idx.shape == index.shape and torch.equal(idx, index.to(idx.device)):
                return views
        return self.finish(self._strong_here(index, seed, epoch).to(self.device))

    def _first_samples(self, split: str, n: int) -> list[tuple[torch.Tensor, int]]:
        raise NotImplementedError

    def _strong_here(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        raise ConfigError(f"dataset '{self.name}' renders strong views in its workers only (prepare_views(2))")

    # ---- delivery -------------------------------------------------------------------------------------------------

    def _close(self) -> None:
        """Drop the loader (its worker processes exit when it is collected)."""

    def _bad(self, split: str, bad: list[tuple[int, str]]) -> None:
        if not self.skip_bad:
            raise DataError(f"{bad[0][1]} (set data.skip_bad_images=true to skip unreadable samples)")
        for index, why in bad:
            if (split, index) not in self.skipped:
                self.skipped[(split, index)] = why
                print(f"kdlab: warning: skipped {why} ({len(self.skipped)} skipped so far)", file=sys.stderr)

    def _deliver(self, split: str, batches: Iterable[tuple[Any, ...]], view: View, release: bool) -> Iterator[Batch]:
        """Worker batches ``(x, y, idx, bad, strong)`` → model-input batches on the device (bad samples skipped or
        refused, labels checked or overridden, a strong view kept for :meth:`strong_batch`)."""
        self._pass += 1
        me = self._pass
        dev, nb = self.device, self.device.type == "cuda"
        override = self._train_y if split == "train" else None
        for x, y, idx, bad, strong in batches:
            if release:
                _release_received()
            if me != self._pass:
                raise RuntimeError("a streamed pass was resumed after another pass over the same dataset began")
            if bad:
                self._bad(split, bad)
            if x is None:
                continue
            if override is not None:
                y = override[idx]
            elif int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise DataError(f"{self.name} {split} labels must lie in [0, {self.num_classes - 1}], "
                                f"found {int(y.min())}..{int(y.max())}")  # fmt: skip
            idx = idx.to(dev, non_blocking=nb)
            if strong is not None and view is not None:
                self._strong = ((view[1], view[2]), idx, self.finish(strong.to(dev, non_blocking=nb)))
            yield self.finish(x.to(dev, non_blocking=nb)), y.to(dev, non_blocking=nb), idx

    def _views(self, view: View) -> tuple[View, ...]:
        """The views each training request asks for (the strong one too after ``prepare_views(2)``)."""
        if view is None or self.views_per_sample < 2:
            return (view,)
        return view, ("strong", view[1], view[2])


class StreamingDataset(StreamBase):
    """Streamed train/test splits of item sources (random access) behind the :class:`~kdlab.data.base.DataSource`
    interface."""

    def __init__(self, name: str, sources: dict[str, ItemSource], num_classes: int, **kwargs: Any) -> None:
        for split in ("train", "test"):
            if split not in sources or len(sources[split]) == 0:
                raise DataError(f"{name}: the {split} split is empty")
        super().__init__(name, num_classes, **kwargs)
        self.sources = sources
        self._requests = _Requests()
        self._loader: DataLoader | None = None

    def split_size(self, split: str) -> int:
        return len(self.sources[check_split(split)])

    def labels(self, split: str) -> torch.Tensor:
        """Labels of a split (loading every sample once when the source does not know them upfront)."""
        check_split(split)
        if split not in self._labels and not (split == "train" and self._train_y is not None):
            src = self.sources[split]
            self._labels[split] = torch.tensor([self._load_here(split, i, None)[1] for i in range(len(src))])
        return super().labels(split)

    def take_first(self, train: int | None, test: int | None) -> StreamingDataset:
        """Keep only the first ``train`` / ``test`` samples of each split (``None``: all)."""
        self._close()
        for split, n in (("train", train), ("test", test)):
            if n is not None:
                self.sources[split] = _Head(self.sources[split], n)
                if split in self._labels:
                    self._labels[split] = self._labels[split][:n]
        if self._train_y is not None and train is not None:
            self._train_y = self._train_y[:train]
        return self

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]:  # fmt: skip
        """Augmented training batches of one epoch, in the order of :func:`~kdlab.data.loader.batch_plan`."""
        view: View = ("train", seed if augment_seed is None else augment_seed,
                      epoch if augment_epoch is None else augment_epoch)  # fmt: skip
        plan = batch_plan(self.num_train, batch_size, train=True, seed=seed, epoch=epoch, start_batch=start_batch,
                          indices=indices, shard=shard)  # fmt: skip
        return self._stream("train", plan, view)

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of ``split`` in order (or of ``indices`` of it), evaluation view."""
        plan = batch_plan(self.split_size(split), batch_size, train=False, indices=indices)
        return self._stream(split, plan, None)

    def _first_samples(self, split: str, n: int) -> list[tuple[torch.Tensor, int]]:
        out: list[tuple[torch.Tensor, int]] = []
        for i in range(self.split_size(split)):
            if len(out) == n:
                break
            xs, y, _, why = load_views(self.sources[split], i, (None,))
            if why is not None:
                self._bad(split, [(i, why)])
                continue
            out.append((xs[0], y))  # type: ignore[index]
        if not out:
            raise DataError(f"{self.name}: no {split} sample could be loaded")
        return out

    def _strong_here(self, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        view: View = ("strong", seed, epoch)
        return stack_inputs([self._load_here("train", int(i), view)[0] for i in index.tolist()])

    def _load_here(self, split: str, index: int, view: View) -> tuple[torch.Tensor, int]:
        try:
            return self.sources[split].load(index, view)
        except BadSample as err:
            raise DataError(str(err)) from None

    def _get_loader(self) -> DataLoader:
        if self._loader is None:
            extra: dict[str, Any] = {}
            if self.workers > 0:
                extra = dict(persistent_workers=True, prefetch_factor=self.prefetch)
            self._loader = DataLoader(
                _Worker(self.sources), batch_sampler=self._requests, num_workers=self.workers, collate_fn=collate,
                pin_memory=self.device.type == "cuda", worker_init_fn=worker_init, **extra,
                generator=torch.Generator().manual_seed(0),  # its seed draw must not advance the global torch RNG
            )  # fmt: skip
        return self._loader

    def _close(self) -> None:
        self._loader = None

    def _stream(self, split: str, plan: Iterator[torch.Tensor], view: View) -> Iterator[Batch]:
        views = self._views(view)  # the plan is set when iteration starts: a pass begun later takes the loader over
        self._requests.plan = ([(split, int(i), views) for i in idx.tolist()] for idx in plan)
        yield from self._deliver(split, self._get_loader(), view, release=self.workers > 0)
