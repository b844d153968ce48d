"""Loading the frozen teacher: one checkpoint, or an ensemble whose logits are averaged (kl-vs-mse §4.3)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from kdlab.config import RunConfig, TeacherConfig, TeacherMember
from kdlab.errors import CheckpointError, ConfigError
from kdlab.engine import checkpoint as ck
from kdlab.engine.atomic import sha256_file
from kdlab.models import ModelOutput, build
from kdlab.models.convert import read_weights


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
    state = read_weights(path, list(model.state_dict()))  # safetensors, or a .pth read weights-only
    check_weights(state, model.state_dict(), f"teacher checkpoint {path}")
    ck.load_into(model, state, spec.name, f"teacher checkpoint {path}")
    return model


def check_weights(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str) -> None:
    """Refuse weights that would be silently wrong: a floating-point tensor of the model stored as integers (int8
    would be cast, not dequantised) or holding NaN/Inf (which would otherwise surface as a NaN loss at step 0)."""
    for key, mine in own.items():
        got = state.get(key)
        if got is None or not mine.is_floating_point():
            continue  # missing keys are load_into's error; integer buffers (num_batches_tracked) are counters
        if not got.is_floating_point():
            raise CheckpointError(f"{source}: '{key}' is {str(got.dtype).removeprefix('torch.')}, not floating point "
                                  "(quantised weights must be dequantised first)")  # fmt: skip
        if not bool(torch.isfinite(got).all()):
            raise CheckpointError(f"{source}: '{key}' holds NaN or infinite values")


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
