"""Loading the frozen teacher: one checkpoint, or an ensemble whose logits are averaged (kl-vs-mse §4.3)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kdlab.config import RunConfig, TeacherConfig, TeacherMember
from kdlab.errors import ConfigError
from kdlab.engine import checkpoint as ck
from kdlab.engine.atomic import sha256_file
from kdlab.models import ModelOutput, build


class EnsembleTeacher(nn.Module):
    """Several frozen teachers seen as one: logits are the average of the members' logits.

    Features are not defined for an ensemble, so ``prepool``/``pooled`` are ``None`` and feature- or
    classifier-based methods refuse ensembles (see ``Method.teacher_outputs``).
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        logits = torch.stack([m.forward_features(x).logits for m in self.members]).mean(0)  # type: ignore[operator]
        return ModelOutput(logits, None, None)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x).logits


def _load_one(spec: TeacherConfig | TeacherMember, num_classes: int) -> nn.Module:
    path = ck.resolve_weights_path(spec.checkpoint)
    model = build(spec, num_classes=num_classes)  # the whole section: a user model's classifier/features/kwargs too
    ck.load_into(model, ck.load_weights_file(path), spec.name, f"teacher checkpoint {path}")
    return model


def load_teacher(cfg: TeacherConfig | RunConfig, num_classes: int) -> nn.Module:
    """Build and load the teacher (strict, one-line errors); an ensemble when ``cfg.ensemble`` lists members.

    ``cfg`` is the teacher section or a whole run config.
    """
    if isinstance(cfg, RunConfig):
        if cfg.teacher is None:
            raise ConfigError("the config has no teacher section")
        cfg = cfg.teacher
    models = [_load_one(cfg, num_classes)]
    models += [_load_one(m, num_classes) for m in cfg.ensemble]
    teacher = models[0] if len(models) == 1 else EnsembleTeacher(models)
    return teacher.eval().requires_grad_(False)


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    """SHA-256 of the teacher's weights file(s): a teacher cache is only valid for the same fingerprint."""
    shas = [sha256_file(ck.resolve_weights_path(c)) for c in [cfg.checkpoint] + [m.checkpoint for m in cfg.ensemble]]
    return shas[0] if len(shas) == 1 else hashlib.sha256("".join(shas).encode()).hexdigest()
