"""One pass over a split in DataLoader workers: each worker plays one planned (virtual) worker, reads its segments,
renders the views and collates uint8 batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import IterableDataset

from kdlab.data.images import ImageViews
from kdlab.data.stream import BadSample, Item, View, collate
from kdlab.data.webdataset.plan import WorkerPlan, _shuffled
from kdlab.data.webdataset.reader import Record, ShardReader


@dataclass
class _Pass:
    """Everything a worker needs for one pass (inherited by the forked worker processes)."""

    reader: ShardReader
    plans: list[WorkerPlan]
    views: ImageViews
    view_set: tuple[View, ...]
    first_worker: int = 0  # the virtual worker DataLoader worker 0 plays (a resumed epoch starts mid-cycle)

    def batches(self, virtual: int) -> Iterator[tuple[Any, ...]]:
        plan = self.plans[virtual]
        stream = _shuffled(self.reader.records(plan.segments), plan.shuffle, plan.shuffle_seed)
        for _ in range(plan.skip):
            next(stream, None)  # samples of the steps before start_batch (a resumed epoch): read, never decoded
        for size in plan.batches:
            items: list[Item] = []
            for _ in range(size):
                rec = next(stream, None)
                if rec is None:
                    break
                items.append(self._item(rec))
            yield collate(items) if items else (None, None, None, [], None)

    def _item(self, rec: Record) -> Item:
        index, data, label, name = rec
        if data is None:
            return None, -1, index, name
        try:
            xs = tuple(self.views.load(data, index, view, name) for view in self.view_set)
        except BadSample as err:
            return None, -1, index, str(err)
        return xs, label, index, None


class _PassDataset(IterableDataset):
    def __init__(self, run: _Pass) -> None:
        self.run = run

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        return self.run.batches((self.run.first_worker + worker) % len(self.run.plans))


def _as_is(batch: Any) -> Any:
    return batch
