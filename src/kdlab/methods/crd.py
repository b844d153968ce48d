"""Contrastive representation distillation (CRD, Tian et al., ICLR 2020) with its memory bank, as released
(RepDistiller ``CRDLoss`` / ``ContrastMemory``).

Each side's pooled feature is embedded (Linear → L2 normalisation, 128-d) and contrasted against the *other* side's
memory: one row per training sample, read at the batch's own index (positive) and at K = 16384 noise indices drawn
from samples of other classes (RepDistiller's ``CIFAR100InstanceSample``, mode ``exact``). Scores are
``exp(⟨m, e⟩/T)`` divided by a constant Z fixed from the first batch (Z = mean score × N), and the NCE loss
(:func:`kdlab.losses.crd_nce`) is summed over both sides. After the loss, each memory row of the batch is updated
with momentum 0.5 and re-normalised.

Under torchrun there is ONE memory: every rank gathers the indices and embeddings of all ranks' batches and applies
the same update, and Z is computed from the global first batch, so the memories stay identical on every rank (DDP
does not re-broadcast them: :attr:`ddp_local_buffers`). The memories and Z are buffers of the method, saved in every
checkpoint, so a resumed run continues with exactly the memory it stopped with.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.distributed import all_gather, all_reduce, get_world_size, is_available, is_initialized
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.errors import ConfigError
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput


class CRDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    feat_weight: float = Field(0.8, ge=0, description="weight β of the CRD term (RepDistiller -b 0.8)")
    feat_dim: int = Field(128, gt=0, description="embedding dimension")
    nce_k: int = Field(16384, gt=0, description="noise samples per positive")
    nce_t: float = Field(0.07, gt=0, description="temperature of the scores")
    nce_m: float = Field(0.5, ge=0, lt=1, description="momentum of the memory update")
    negatives: Literal["other_classes", "uniform"] = Field(
        "other_classes", description="noise indices: samples of other classes (release 'exact' mode) or any sample"
    )


def _distributed() -> bool:
    return is_available() and is_initialized() and get_world_size() > 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (rows may differ in number between ranks) over all ranks, in rank order; identity when
    not distributed."""
    if not _distributed():
        return x
    world = get_world_size()
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


class _Embed(nn.Sequential):
    """Linear projection followed by L2 normalisation (RepDistiller ``Embed``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(super().forward(x.flatten(1)), dim=1)


@METHODS.register("crd")
class CRD(Method):
    """``ce_weight·CE + feat_weight·(NCE_student + NCE_teacher)``; see the module docstring."""

    Params = CRDParams
    teacher_outputs = ("pooled",)
    needs_index = True
    needs_train_labels = True
    ddp_local_buffers = ("memory_student", "memory_teacher", "z", "_order", "_start", "_count", "_labels")

    def __init__(self, params: CRDParams) -> None:
        super().__init__(params)
        self.num_samples = 0
        self._z_ready = [False, False]

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        p = self.params
        self.num_samples = num_samples
        bound = 1.0 / math.sqrt(p.feat_dim / 3)  # release initialisation: uniform(−1/√(d/3), 1/√(d/3))
        self.register_buffer("memory_student", torch.rand(num_samples, p.feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_samples, p.feat_dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))  # normalisation constants (student, teacher); < 0: unset
        if p.negatives == "other_classes":
            if labels is None:
                raise ConfigError("crd: negatives=other_classes needs the training labels; use negatives=uniform")
            labels = labels.long().cpu()
            count = torch.bincount(labels)
            if int(count.max()) >= num_samples:
                raise ConfigError("crd: negatives=other_classes needs at least two classes in the training set")
            self.register_buffer("_labels", labels, persistent=False)
            self.register_buffer("_order", torch.argsort(labels, stable=True), persistent=False)
            self.register_buffer("_count", count, persistent=False)
            self.register_buffer("_start", torch.cumsum(count, 0) - count, persistent=False)

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        from kdlab.methods.feature import dry_forward

        if self.num_samples == 0:
            raise ConfigError("crd keeps a memory of the training set: call method.bind_data(num_samples, labels) "
                              "before setup (the engine does)")  # fmt: skip
        if teacher is None:
            raise ConfigError("method 'crd' needs a teacher")
        s, t = dry_forward(student, example).pooled, dry_forward(teacher, example).pooled
        d = self.params.feat_dim
        self.embed_student = _Embed(nn.Linear(s.flatten(1).shape[1], d)).to(example.device)
        self.embed_teacher = _Embed(nn.Linear(t.flatten(1).shape[1], d)).to(example.device)

    def negatives(self, index: torch.Tensor) -> torch.Tensor:
        """B×K noise indices for the batch (global RNG, on the batch's device)."""
        k, n = self.params.nce_k, self.num_samples
        if self.params.negatives == "uniform":
            return torch.randint(0, n, (len(index), k), device=index.device)
        cls = self._labels[index]
        count, start = self._count[cls][:, None], self._start[cls][:, None]
        r = (torch.rand(len(index), k, device=index.device) * (n - count)).long().clamp_(max=n - 1)
        r = torch.minimum(r, n - count - 1)  # guard the rare rounding of rand·(n − count) up to n − count
        return self._order[r + (r >= start) * count]  # skip the block of the sample's own class in sorted order

    def _scores(self, embedding: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, side: int) -> torch.Tensor:
        """exp(⟨memory[idx], e⟩/T)/Z, B×(1+K); computed as one B×N product then gathered (no B×(1+K)×D copy)."""
        logits = (embedding.float() @ memory.T).gather(1, idx) / self.params.nce_t
        out = torch.exp(logits)
        if not self._z_ready[side] and float(self.z[side]) < 0:  # first batch: Z = mean score × N (global batch)
            with torch.no_grad():
                total = torch.stack([out.sum(), torch.tensor(float(out.numel()), device=out.device)]).double()
                if _distributed():
                    all_reduce(total)
                self.z[side] = float(total[0] / total[1]) * self.num_samples
        self._z_ready[side] = True  # checked once per process (also after a resume restored z)
        return out / self.z[side].clone()

    @torch.no_grad()
    def _update(self, index: torch.Tensor, e_s: torch.Tensor, e_t: torch.Tensor) -> None:
        idx = gather_rows(index)
        m = self.params.nce_m
        for name, e in (("memory_student", gather_rows(e_s)), ("memory_teacher", gather_rows(e_t))):
            memory = getattr(self, name)
            rows = memory[idx] * m + e.to(memory.dtype) * (1 - m)
            # out of place: the old memory is saved for the backward pass of this step's scores
            setattr(self, name, memory.index_copy(0, idx, F.normalize(rows, dim=1)))

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int,
        index: torch.Tensor | None = None, **_: object,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        p = self.params
        assert teacher is not None
        if index is None:
            raise ValueError("crd needs the training-set indices of the batch: losses(..., index=idx)")
        out = {}
        if p.feat_weight:
            e_s = self.embed_student(student.pooled)
            e_t = self.embed_teacher(teacher.pooled)
            idx = torch.cat([index[:, None], self.negatives(index)], dim=1)
            n = self.num_samples
            loss = L.crd_nce(self._scores(e_s, self.memory_teacher, idx, 0), n)
            loss = loss + L.crd_nce(self._scores(e_t, self.memory_student, idx, 1), n)
            out["crd"] = p.feat_weight * loss
            self._update(index, e_s.detach(), e_t.detach())
        if p.ce_weight:
            out["ce"] = p.ce_weight * L.cross_entropy(student.logits, target)
        return out
