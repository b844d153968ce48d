"""Multi-process training with ``torchrun``: process-group set-up, data sharding and rank-0-only writing.

``torchrun --nproc_per_node=N -m kdlab train|distill ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; kdlab then
joins the process group (NCCL on CUDA, gloo on CPU), wraps the trainable objective in
``DistributedDataParallel`` and gives every rank an equal slice of each global batch (``train.batch_size`` stays
the *global* batch, so results match a single process with the same batch). Multi-node runs use torchrun's
standard rendezvous flags (``--nnodes``, ``--rdzv-backend``, ``--rdzv-endpoint``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdlab.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank (used to agree on errors before anything is written)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device asks for CUDA but it is not available")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local_rank)


def shard(global_idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of a global batch: a contiguous, near-equal slice (all ranks see disjoint samples)."""
    if not info.enabled:
        return global_idx
    return global_idx.tensor_split(info.world)[info.rank]
