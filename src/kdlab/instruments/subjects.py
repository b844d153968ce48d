"""The models an analysis looks at: the run's student, and the teacher it is compared with (the run's own, another
run's, or a weights file with its architecture), resolved and checked before anything is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdlab.errors import KdlabError


def method_label(cfg: Any) -> str:
    """``kd T=4`` style description of a run's method."""
    params = cfg.method.params()
    extra = f" T={params['temperature']:g}" if isinstance(params.get("temperature"), (int, float)) else ""
    return f"{cfg.method.name}{extra}"


@dataclass
class TeacherChoice:
    """The teacher an analysis compares with: a description, and how to build it once the class count is known."""

    name: str
    weights: str
    spec: Any  # what ``kdlab.models.build`` takes (a name or a config section); None for an ensemble
    load: Callable[[int], torch.nn.Module]


def resolve_teacher(cfg: Any, teacher: str | Path | None, teacher_arch: str | None) -> TeacherChoice | None:
    """The teacher to compare with, or None when there is none (files are checked now, models built later).

    ``teacher`` may be a run directory (its ``config.yaml`` describes the model) or a ``.safetensors`` file (the
    architecture is ``teacher_arch``, else the run config's ``teacher`` section). Without ``teacher``, the run
    config's own ``teacher`` section is used (an ensemble teacher included).
    """
    from kdlab.config import load_config
    from kdlab.engine.checkpoint import resolve_weights_path

    if teacher is not None:
        path = Path(teacher)
        weights = resolve_weights_path(path)
        spec: Any = teacher_arch
        if spec is None and path.is_dir() and (path / "config.yaml").is_file():
            spec = load_config(path / "config.yaml").model
        if spec is None and cfg.teacher is not None:
            spec = cfg.teacher
        if spec is None:
            raise KdlabError(
                f"cannot tell the architecture of teacher {teacher}: pass its run directory or --teacher-arch NAME"
            )
        if isinstance(spec, str):
            from kdlab.models import MODELS
            from kdlab.models.taps import is_user_model, resolve_user_class

            if is_user_model(spec):
                resolve_user_class(spec, what="--teacher-arch")  # trust decided now (kdlab.trust)
            else:
                MODELS.get(spec)  # one-line error with a suggestion
        name = str(getattr(spec, "name", spec))
        return TeacherChoice(name, str(weights), spec, lambda k: load_model(spec, weights, k, "teacher weights"))
    if cfg.teacher is None:
        return None
    t = cfg.teacher
    try:
        files = [str(resolve_weights_path(c)) for c in [t.checkpoint] + [m.checkpoint for m in t.ensemble]]
    except KdlabError as err:
        raise KdlabError(
            f"the run's teacher cannot be loaded ({err}); pass --teacher RUN_OR_CHECKPOINT, or --no-teacher"
        ) from None

    def load(k: int) -> torch.nn.Module:
        from kdlab.engine.teachers import load_teacher

        return load_teacher(t, k)

    name = t.name + (f" + {len(t.ensemble)} (ensemble)" if t.ensemble else "")
    return TeacherChoice(name, ", ".join(files), None if t.ensemble else t, load)


def load_model(spec: Any, weights: Path, num_classes: int, what: str) -> torch.nn.Module:
    """``spec`` built for ``num_classes`` with the weights file ``weights`` loaded, frozen in eval mode."""
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    model = build(spec, num_classes=num_classes)
    arch = str(getattr(spec, "name", spec))
    ck.load_into(model, ck.load_weights_file(weights), arch, f"{what} {weights}")
    return model.eval().requires_grad_(False)
