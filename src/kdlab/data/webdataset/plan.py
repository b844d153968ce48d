"""Who reads what in an epoch: the shards in a seeded order cut into one contiguous range per rank and per worker,
each through a seeded shuffle buffer — a pure function of (seed, epoch), the shard counts, ranks and workers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdlab.data.webdataset.export import SplitShards
from kdlab.data.webdataset.reader import Record, Segment
from kdlab.errors import ConfigError
from kdlab.seeding import derive_seed


@dataclass(frozen=True)
class WorkerPlan:
    """What one (virtual) worker delivers in a pass: its segments in reading order, the sizes of its batches, how
    many leading samples it drops (a resumed epoch), and its shuffle buffer (``None``: in order)."""

    segments: list[Segment]
    batches: list[int]
    skip: int = 0
    shuffle: int | None = None
    shuffle_seed: int = 0


@dataclass
class Sequence:
    """A pass's samples: shards in reading order with the kept positions of each (``None``: all of them)."""

    order: list[int]
    kept: dict[int, np.ndarray] | None
    cum: np.ndarray  # cumulative sample counts along ``order``

    @classmethod
    def build(cls, shards: SplitShards, order: list[int], keep: np.ndarray | None) -> Sequence:
        kept = None
        counts = []
        if keep is not None:
            kept = {}
            for i in order:
                s = shards.shards[i]
                lo, hi = np.searchsorted(keep, [s.offset, s.offset + s.count])
                kept[i] = keep[lo:hi] - s.offset
                counts.append(hi - lo)
        else:
            counts = [shards.shards[i].count for i in order]
        return cls(order, kept, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def segments(self, start: int, stop: int) -> list[Segment]:
        """The segments covering sequence positions ``[start, stop)``."""
        out = []
        k = int(np.searchsorted(self.cum, start, side="right")) - 1
        while start < stop and k < len(self.order):
            lo, hi = int(self.cum[k]), int(self.cum[k + 1])
            end = min(stop, hi)
            if end > start:
                out.append(Segment(self.order[k], start - lo, end - lo))
            start = max(start, end)
            k += 1
        return out


def _local_sizes(n: int, batch_size: int, shard: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[list[int], int]:
    """This rank's part of each global batch (sizes) and the number of samples of the lower ranks' parts. ``shard``
    maps a global batch to this rank's part, a contiguous slice in rank order (:func:`kdlab.engine.distributed.shard`)."""
    sizes, before = [], 0
    for start in range(0, n, batch_size):
        g = min(batch_size, n - start)
        if shard is None:
            sizes.append(g)
            continue
        part = shard(torch.arange(g))
        m = len(part)
        first = int(part[0]) if m else 0
        if m and not torch.equal(part.cpu(), torch.arange(first, first + m)):
            raise ConfigError("webdataset: each rank's part of a batch must be a contiguous slice")
        sizes.append(m)
        before += first
    return sizes, before


def rank_plan(seq: Sequence, batch_size: int, workers: int, *, start_batch: int = 0,
              shard: Callable[[torch.Tensor], torch.Tensor] | None = None, shuffle: int | None = None,
              seed_key: tuple[Any, ...] = (0,)) -> list[WorkerPlan]:  # fmt: skip
    """One plan per (virtual) worker of this rank for a training pass over ``seq``: the rank's contiguous range of the
    sequence, cut into one contiguous range per worker; worker ``w`` delivers steps ``w, w + W, …``."""
    sizes, start = _local_sizes(seq.total, batch_size, shard)
    w_count = max(1, workers)
    plans = []
    for w in range(w_count):
        mine = sizes[w::w_count]
        n = sum(mine)
        skipped = sum(sizes[t] for t in range(w, min(start_batch, len(sizes)), w_count))
        batches = [sizes[t] for t in range(w, len(sizes), w_count) if t >= start_batch]
        plans.append(WorkerPlan(seq.segments(start, start + n), batches, skipped, shuffle,
                                derive_seed(*seed_key, "shuffle-buffer", start)))  # fmt: skip
        start += n
    return plans


def eval_plan(seq: Sequence, batch_size: int, workers: int) -> list[WorkerPlan]:
    """Batches in sequence order, worker ``w`` delivering batches ``w, w + W, …`` (it reads past the others')."""
    w_count = max(1, workers)
    plans = []
    for w in range(w_count):
        segments, batches = [], []
        for start in range(w * batch_size, seq.total, w_count * batch_size):
            stop = min(start + batch_size, seq.total)
            segments += seq.segments(start, stop)
            batches.append(stop - start)
        plans.append(WorkerPlan(segments, batches))
    return plans


def _shuffled(records: Iterator[Record], size: int | None, seed: int) -> Iterator[Record]:
    """``records`` through a seeded shuffle buffer of ``size`` (``None``: unchanged)."""
    if not size or size <= 1:
        yield from records
        return
    import random

    rng = random.Random(seed)
    buf: list[Record] = []
    for rec in records:
        if len(buf) < size:
            buf.append(rec)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = rec
    rng.shuffle(buf)
    yield from buf
