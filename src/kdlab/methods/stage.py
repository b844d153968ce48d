"""The shared part of the multi-stage feature methods (AT, SP, NST, FT, AB, OFD, ReviewKD; one module each idea:
:mod:`~kdlab.methods.parameter_free`, :mod:`~kdlab.methods.ft`, :mod:`~kdlab.methods.ab`, :mod:`~kdlab.methods.ofd`,
:mod:`~kdlab.methods.reviewkd`).

They read the models' stage features (:attr:`kdlab.models.ModelOutput.stages`, or ``preacts`` — the same stages
before their last ReLU), which every zoo model provides and user models collect by naming their stage modules
(``model.features: [layer1, layer2, layer3]``). Defaults are the released ones (mdistiller's CIFAR-100 configs for
AT, SP, NST, OFD, ReviewKD; RepDistiller's ``run_cifar_distill.sh`` for FT and AB), each next to a cross-entropy
term of weight 1:

==========  =====================  =============  ===============================================================
method      features               weight         learnable parts
==========  =====================  =============  ===============================================================
``at``      every stage            1000           none (p = 2)
``sp``      last stage             3000           none
``nst``     every stage            50             none
``ft``      last stage             200            paraphraser (teacher side, trained first), translator (student)
``ab``      every pre-activation   1 (×3/1000)    per-stage connectors; trained first, then CE only
``ofd``     every pre-activation   0.001          per-stage conv-BN connectors; margins from the teacher's BN
``reviewkd``  stages + pooled      5, warm-up 20  attention-based fusion (ABF) modules
==========  =====================  =============  ===============================================================

Student and teacher stages are paired as the releases do: AT and NST ``zip`` the two lists from the first stage;
OFD, AB and ReviewKD keep the last ``min(len)`` of each. FT and AB first train their learnable parts for
``init_epochs`` (30, as released) inside the same run: :attr:`Method.pre_epochs` makes the engine run epochs
1 − init_epochs … 0 before the main ones (checkpointed and resumable like any epoch) with RepDistiller's ``init``
optimizer (:attr:`Method.pre_optim`). Maps may be 2-D (N×C×H×W) or 1-D (N×C×L, e.g. the MNIST-1D CNN); SP takes
vector stages as they are and OFD, AB and ReviewKD as length-1 maps (the MNIST-1D MLP student), while AT, NST and
FT need maps. Teacher caches hold no stage features: these methods need a live teacher.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.methods.base import MethodParams
from kdlab.methods.feature import _FeatureMethod
from kdlab.models.output import ModelOutput
from kdlab.models.taps import TappedModel

#: convolution / transposed convolution / BatchNorm classes by number of spatial dimensions
CONV = {1: nn.Conv1d, 2: nn.Conv2d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def _section(who: str) -> str:
    return "model" if who == "student" else "teacher"


def check_stages(method: str, who: str, model: nn.Module, out: ModelOutput, field: str, maps: bool) -> None:
    """One-line errors for stage features a method cannot use: none, token-shaped (N×T×C) or, when ``maps``,
    not channels-first maps."""
    stages = getattr(out, field)
    if not stages:
        raise ConfigError(
            f"{method}: the {who} ({type(model).__name__}) exposes no stage features; for a user model name its stage "
            f"modules in {_section(who)}.features, e.g. [layer1, layer2, layer3]"
        )
    path = model.token_shaped(out) if isinstance(model, TappedModel) else None
    if path is not None:
        raise ConfigError(
            f"{method}: the {who}'s stage '{path}' is token-shaped (N×T×C); stage methods need channel-first maps "
            "(N×C×H×W / N×C×L): tap convolutional modules"
        )
    if maps:
        bad = next((t for t in stages if t.dim() not in (3, 4)), None)
        if bad is not None:
            raise ConfigError(
                f"{method} needs feature maps (N×C×H×W or N×C×L); the {who}'s stages include {tuple(bad.shape)}"
            )


def as_maps(stages: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Vector stages (N×D, e.g. an MLP's hidden layers) as 1-D maps of length 1 (N×D×1); maps unchanged."""
    return tuple(t.unsqueeze(-1) if t.dim() == 2 else t for t in stages)


def last_aligned(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> tuple[list, list]:
    """The last ``min(len(a), len(b))`` entries of each (mdistiller's ``_align_list``)."""
    n = min(len(a), len(b))
    return list(a[len(a) - n :]), list(b[len(b) - n :])


def with_ce(out: dict[str, torch.Tensor], weight: float, logits: torch.Tensor, target: torch.Tensor) -> dict:
    """``out`` plus the weighted cross-entropy term ``ce`` (when ``weight`` is not 0)."""
    if weight:
        out["ce"] = weight * cross_entropy(logits, target)
    return out


class StageParams(MethodParams):
    """Parameters every stage method has: the weight of its cross-entropy term."""

    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")


#: RepDistiller's optimizer for the pre-phase of FT and AB (``helper/pretrain.py``, ``init``): SGD with the script's
#: momentum and weight decay (0.9, 5e-4), no Nesterov, every parameter decayed
RELEASE_PRE_OPTIM: dict[str, Any] = {"momentum": 0.9, "nesterov": False, "weight_decay": 5e-4}


class PrePhaseParams(StageParams):
    """Parameters of the stage methods with a pre-phase (FT, AB): which optimizer settings it trains with."""

    init_optim: Literal["release", "run"] = Field(
        "release", description="pre-phase optimizer: release = RepDistiller's init (SGD, momentum 0.9, no Nesterov, "
        "weight decay 5e-4 on every parameter; needs optim.name=sgd); run = the run's optim settings",
    )  # fmt: skip


class StageMethod(_FeatureMethod):
    """Shared setup: a dry forward of both models, checks of their stages, then :meth:`build`."""

    teacher_outputs = ("stages",)
    #: which stage field the method reads from both models, whether it must hold maps, and whether vector stages
    #: are accepted as length-1 maps (:func:`as_maps`: OFD, AB and ReviewKD compare element-wise, so an MLP student
    #: works; AT / NST / FT's spatial statistics would be constant on them)
    field: ClassVar[str] = "stages"
    maps: ClassVar[bool] = True
    vectors: ClassVar[bool] = False

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        name = type(self).__name__
        maps = self.maps and not self.vectors
        check_stages(name, "student", student, s_out, self.field, maps)
        check_stages(name, "teacher", teacher, t_out, self.field, maps)  # type: ignore[arg-type]
        if self.maps:
            s_dim, t_dim = as_maps(getattr(s_out, self.field))[0].dim(), as_maps(getattr(t_out, self.field))[0].dim()
            if s_dim != t_dim:
                raise ConfigError(f"{name}: student maps are {s_dim - 2}-D but the teacher's are {t_dim - 2}-D")
        self.build(s_out, t_out, student, teacher)  # type: ignore[arg-type]

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        """Create the learnable parts from example outputs (nothing by default)."""


class PrePhaseMethod(StageMethod):
    """A stage method whose learnable parts train first, for ``params.init_epochs`` pre-phase epochs, with the
    release's optimizer settings (``init_optim``)."""

    def __init__(self, params: PrePhaseParams) -> None:
        super().__init__(params)
        self.pre_epochs = params.init_epochs  # type: ignore[attr-defined]
        self.pre_optim = dict(RELEASE_PRE_OPTIM) if params.init_optim == "release" else None
