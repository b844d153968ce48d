"""Teacher-output cache: compute the frozen teacher's outputs once per augmented view and replay them.

Augmentation parameters are a pure function of ``(augment seed, epoch, sample index)``. View ``v`` (0-based) of
the cache holds the teacher's outputs for every training sample under the augmentation of epoch ``v + 1``; a run
with ``teacher.cache=FILE`` replays view ``(epoch − 1) mod V`` and augments the student's input with exactly that
view's parameters. With ``V`` = number of epochs, this is the live run (bit-identical with a float32 cache); with
fewer views it is the FKD-style approximation. The shuffle order, initialisation and everything else still follow
the run's own seed, so one cache serves every student, method and seed of a sweep.

File format: one safetensors file (memory-mapped on load) with tensors ``logits.{v}`` (N×K) and, optionally,
``pooled.{v}`` / ``prepool.{v}``; its metadata records what the cache was made from and is checked before use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import nn

from kdlab.data import Dataset, batches
from kdlab.engine.atomic import atomic_write_bytes
from kdlab.errors import CheckpointError, ConfigError
from kdlab.models import ModelOutput

FORMAT = "kdlab-teacher-cache-v1"
FIELDS = ("logits", "pooled", "prepool")


@dataclass
class CacheInfo:
    views: int
    num_samples: int
    num_classes: int
    augment_seed: int
    fields: tuple[str, ...]
    meta: dict[str, Any]


@torch.inference_mode()
def build_cache(
    teacher: nn.Module,
    data: Dataset,
    views: int,
    out: str | Path,
    *,
    augment_seed: int,
    fields: tuple[str, ...] = ("logits",),
    dtype: torch.dtype = torch.float16,
    batch_size: int = 512,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run ``teacher`` over ``views`` augmented passes of ``data.train`` and write the cache atomically."""
    if views < 1:
        raise ConfigError("--views must be at least 1")
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise ConfigError(f"unknown cache field '{bad[0]}'; choose from {', '.join(FIELDS)}")
    teacher.eval()
    n = len(data.train)
    tensors: dict[str, torch.Tensor] = {}
    order = torch.arange(n, device=data.train.x.device)
    for v in range(views):
        store: dict[str, torch.Tensor] = {}
        for x, _y, idx in batches(data.train, data.transform, batch_size, train=True, seed=augment_seed,
                                  epoch=v + 1, indices=order):  # fmt: skip
            out_v = teacher.forward_features(x)  # type: ignore[operator]
            for f in fields:
                t = getattr(out_v, f)
                if f not in store:
                    store[f] = torch.empty((n, *t.shape[1:]), dtype=dtype)
                store[f][idx.cpu()] = t.to("cpu", dtype)
        for f, t in store.items():
            tensors[f"{f}.{v}"] = t
        if progress:
            progress(v + 1, views)
    info = {
        "format": FORMAT, "views": views, "num_samples": n, "num_classes": data.num_classes,
        "augment_seed": augment_seed, "fields": list(fields), "dtype": str(dtype).replace("torch.", ""),
        "dataset": data.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {}),
    }  # fmt: skip
    out = Path(out)
    atomic_write_bytes(out, st_save(tensors, metadata={"kdlab": json.dumps(info)}))
    return out


class TeacherCache:
    """A cache opened for replay: ``outputs(epoch, index)`` gives the teacher's outputs for a batch."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"teacher cache not found: {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
            meta = json.loads((self._file.metadata() or {})["kdlab"])
        except Exception as err:
            raise CheckpointError(f"{self.path} is not a kdlab teacher cache ({type(err).__name__})") from None
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a kdlab teacher cache (format {meta.get('format')!r})")
        self.info = CacheInfo(meta["views"], meta["num_samples"], meta["num_classes"], meta["augment_seed"],
                              tuple(meta["fields"]), meta)  # fmt: skip
        self.device = torch.device(device)
        self._view = -1
        self._tensors: dict[str, torch.Tensor] = {}

    def check(self, data: Dataset, teacher_fingerprint: str | None, needs: tuple[str, ...]) -> None:
        """Refuse a cache made for other data, another teacher, or lacking outputs the method needs."""
        i = self.info
        if i.num_samples != len(data.train) or i.num_classes != data.num_classes or i.meta.get("dataset") != data.name:
            raise ConfigError(
                f"teacher cache {self.path} was made for {i.meta.get('dataset')} with {i.num_samples} samples and "
                f"{i.num_classes} classes; this run has {data.name} with {len(data.train)} and {data.num_classes}"
            )
        want = i.meta.get("teacher_sha256")
        if teacher_fingerprint and want and teacher_fingerprint != want:
            raise ConfigError(f"teacher cache {self.path} was made from another teacher checkpoint")
        missing = [f for f in needs if f not in i.fields]
        if missing:
            raise ConfigError(f"teacher cache {self.path} lacks '{missing[0]}' (rebuild with --fields {','.join(needs)})")

    def view_of(self, epoch: int) -> int:
        return (epoch - 1) % self.info.views

    def augment_epoch(self, epoch: int) -> int:
        """The augmentation epoch whose parameters the student must use in ``epoch``."""
        return self.view_of(epoch) + 1

    def outputs(self, epoch: int, index: torch.Tensor) -> ModelOutput:
        v = self.view_of(epoch)
        if v != self._view:  # load one view at a time onto the training device
            self._tensors = {f: self._file.get_tensor(f"{f}.{v}").to(self.device) for f in self.info.fields}
            self._view = v
        got = {f: t[index].float() for f, t in self._tensors.items()}
        return ModelOutput(got.get("logits"), got.get("prepool"), got.get("pooled"))  # type: ignore[arg-type]
