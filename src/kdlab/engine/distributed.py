"""Multi-process training with ``torchrun``: process-group set-up, data sharding and rank-0-only writing.

``torchrun --nproc_per_node=N -m kdlab train|distill ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; kdlab then
joins the process group (NCCL on CUDA, gloo on CPU), wraps the trainable objective in
``DistributedDataParallel`` and gives every rank an equal slice of each global batch (``train.batch_size`` stays
the *global* batch, so results match a single process with the same batch). Multi-node runs use torchrun's
standard rendezvous flags (``--nnodes``, ``--rdzv-backend``, ``--rdzv-endpoint``). A process that ``srun`` started as
one of several tasks of a Slurm job step (``--launcher slurm`` with ``launcher.nodes`` × ``tasks_per_node`` > 1, or
``srun -n N python -m kdlab ...`` by hand) takes the same variables from Slurm's (:func:`slurm_rendezvous`).

BatchNorm is the one exception to "N processes = 1 process": by default each rank normalises with the statistics of
its own slice of the batch (and rank 0's running statistics are the ones saved), so losses and weights drift from a
single-process run. ``train.sync_bn=true`` computes the statistics over the global batch (:func:`sync_batchnorm`),
which restores the equivalence at the cost of two small all-reduces per BatchNorm layer and step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list: ``gpu[07-09,12],cpu3`` → ``gpu07``."""
    m = re.match(r"([^\[,]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    if m is None or not m.group(2):
        return nodelist.split(",")[0].strip()
    return m.group(1) + re.split(r"[-,]", m.group(2))[0] + m.group(3)


def slurm_rendezvous(environ: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's ``env://`` variables for a process that ``srun`` started as one of several tasks of a job
    step (``SLURM_STEP_NUM_TASKS`` > 1): rank ``SLURM_PROCID``, the first node of the step as master, a port derived
    from the job id (``MASTER_ADDR`` / ``MASTER_PORT`` if set win). Empty under torchrun (``WORLD_SIZE`` set), in a
    batch script or a one-task step."""
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")
    if "WORLD_SIZE" in environ or "SLURM_PROCID" not in environ or not tasks.isdigit() or int(tasks) <= 1:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    job = environ.get("SLURM_JOB_ID", "0")
    return {
        "WORLD_SIZE": tasks, "RANK": environ["SLURM_PROCID"], "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodes),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(job) % 20000 if job.isdigit() else 29500),
    }  # fmt: skip


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun or as one of several srun tasks (``WORLD_SIZE`` > 1); a
    no-op otherwise."""
    os.environ.update(slurm_rendezvous(os.environ))
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


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: object, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch: per-channel sums are all-reduced over
    the ranks (differentiably, so gradients flow through the shared mean and variance), which makes N processes
    compute exactly what one process computes on the whole batch. Works on every backend (gloo/CPU included,
    where ``torch.nn.SyncBatchNorm`` refuses); outside training or a process group it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = all_reduce(torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype))
        mean = all_reduce(x.sum(dims)) / count  # two passes (mean, then squared deviations): as stable as 1 process
        var = all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """``train.sync_bn``: every BatchNorm layer of ``model`` computes global-batch statistics under DDP (CUDA:
    ``torch.nn.SyncBatchNorm``; other devices: :class:`GlobalBatchNorm`). Parameters and buffers are kept (same
    objects, same state-dict keys). Single-process runs are left unchanged."""
    if not info.enabled:
        return model
    if next(model.parameters(), torch.empty(0)).is_cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        out = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out.weight, out.bias = module.weight, module.bias  # the same Parameters
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child))
    return out


def shard(global_idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's part of a global batch: a contiguous, near-equal slice (all ranks see disjoint samples)."""
    if not info.enabled:
        return global_idx
    return global_idx.tensor_split(info.world)[info.rank]
