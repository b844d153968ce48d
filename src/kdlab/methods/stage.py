"""Multi-stage feature methods: AT, SP, NST, FT, AB, OFD and ReviewKD.

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
1 − init_epochs … 0 before the main ones (checkpointed and resumable like any epoch) at the constant rate
``init_lr``. Maps may be 2-D (N×C×H×W) or 1-D (N×C×L, e.g. the MNIST-1D CNN); SP takes vector stages as they are
and OFD, AB and ReviewKD as length-1 maps (the MNIST-1D MLP student), while AT, NST and FT need maps. Teacher
caches hold no stage features: these methods need a live teacher.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from kdlab import losses as L
from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy
from kdlab.methods.base import METHODS, MethodParams
from kdlab.methods.feature import _FeatureMethod
from kdlab.models.connectors import common_spatial, reduce_to
from kdlab.models.output import ModelOutput
from kdlab.models.taps import TappedModel

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


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


def _ce(out: dict[str, torch.Tensor], weight: float, logits: torch.Tensor, target: torch.Tensor) -> dict:
    if weight:
        out["ce"] = weight * cross_entropy(logits, target)
    return out


class _StageParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")


class _StageMethod(_FeatureMethod):
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


# ---------------------------------------------------------------------------------------------------------------------
# parameter-free: AT, SP, NST


class ATParams(_StageParams):
    feat_weight: float = Field(1000.0, ge=0, description="weight β of the attention term (summed over stages)")
    p: float = Field(2.0, gt=0, description="exponent of the attention map Σ_c |f_c|^p")


@METHODS.register("at")
class AT(_StageMethod):
    """Attention transfer: ``ce_weight·CE + feat_weight·Σ_stages at(f_s, f_t, p)`` (:func:`kdlab.losses.at`)."""

    Params = ATParams

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            out["feature"] = p.feat_weight * sum(L.at(s, t, p.p) for s, t in zip(student.stages, teacher.stages))
        return _ce(out, p.ce_weight, student.logits, target)


class SPParams(_StageParams):
    feat_weight: float = Field(3000.0, ge=0, description="weight γ of the similarity-preserving term")


@METHODS.register("sp")
class SP(_StageMethod):
    """Similarity preserving: ``ce_weight·CE + feat_weight·sp(last student stage, last teacher stage)``
    (:func:`kdlab.losses.sp`; mdistiller ``feats[-1]``). Vector stages work too."""

    Params = SPParams
    maps = False

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            out["feature"] = p.feat_weight * L.sp(student.stages[-1], teacher.stages[-1])
        return _ce(out, p.ce_weight, student.logits, target)


class NSTParams(_StageParams):
    feat_weight: float = Field(50.0, ge=0, description="weight λ of the MMD term (summed over stages)")


@METHODS.register("nst")
class NST(_StageMethod):
    """Neuron selectivity transfer: ``ce_weight·CE + feat_weight·Σ_stages nst(f_s, f_t)`` (:func:`kdlab.losses.nst`)."""

    Params = NSTParams

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            out["feature"] = p.feat_weight * sum(L.nst(s, t) for s, t in zip(student.stages, teacher.stages))
        return _ce(out, p.ce_weight, student.logits, target)


# ---------------------------------------------------------------------------------------------------------------------
# FT: paraphraser (pre-phase) + translator


def _ft_stack(dims: int, channels: list[int], bn: bool, transpose: bool = False) -> nn.Sequential:
    """3×3 convs (stride 1, 'same' padding, with bias) each followed by [BN] and LeakyReLU(0.1), as RepDistiller's
    ``Paraphraser`` / ``Translator``."""
    layer = (_CONV_T if transpose else _CONV)[dims]
    mods: list[nn.Module] = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        mods += [layer(cin, cout, 3, 1, 1)] + ([_BN[dims](cout)] if bn else []) + [nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*mods)


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder of FT: the encoder's output is the teacher factor (k·C channels)."""

    def __init__(self, dims: int, channels: int, factor_channels: int) -> None:
        super().__init__()
        c, k = channels, factor_channels
        self.encoder = _ft_stack(dims, [c, c, k, k], bn=False)
        self.decoder = _ft_stack(dims, [k, k, c, c], bn=False, transpose=True)


class FTParams(_StageParams):
    feat_weight: float = Field(200.0, ge=0, description="weight β of the factor-transfer term (RepDistiller -b 200)")
    rate: float = Field(0.5, gt=0, le=1, description="paraphrase rate k: factor channels = k × teacher channels")
    init_epochs: int = Field(30, ge=0, description="pre-phase epochs training the paraphraser (RepDistiller 30)")
    init_lr: float | None = Field(
        0.01, gt=0, description="pre-phase learning rate (RepDistiller: 0.01 for ResNet/WRN students); null: optim.lr"
    )  # fmt: skip


@METHODS.register("ft")
class FT(_StageMethod):
    """Factor transfer: the paraphraser first learns to reconstruct the teacher's last stage (MSE, ``init_epochs``
    pre-phase epochs); then ``ce_weight·CE + feat_weight·ft(translator(f_s), encoder(f_t))`` with the paraphraser
    frozen (:func:`kdlab.losses.ft`). The student is not trained during the pre-phase."""

    Params = FTParams

    def __init__(self, params: FTParams) -> None:
        super().__init__(params)
        self.pre_epochs = params.init_epochs

    def pre_lr(self, lr: float) -> float:
        return self.params.init_lr or lr

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        s, t = s_out.stages[-1], t_out.stages[-1]
        dims, k = t.dim() - 2, max(1, int(t.shape[1] * self.params.rate))
        self.paraphraser = Paraphraser(dims, t.shape[1], k).to(t.device)
        self.translator = _ft_stack(dims, [s.shape[1], s.shape[1], k, k], bn=True).to(s.device)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        f_t = teacher.stages[-1]
        if epoch <= 0:  # pre-phase: the paraphraser alone, on the teacher's feature
            return {"reconstruction": F.mse_loss(self.paraphraser.decoder(self.paraphraser.encoder(f_t)), f_t)}
        out = {}
        if p.feat_weight:
            with torch.no_grad():
                factor_t = self.paraphraser.encoder(f_t)
            out["feature"] = p.feat_weight * L.ft(self.translator(student.stages[-1]), factor_t)
        return _ce(out, p.ce_weight, student.logits, target)


# ---------------------------------------------------------------------------------------------------------------------
# AB and OFD: connectors on pre-activations


class _Connect(nn.Module):
    """OFD's student pre-activation → teacher's: pool the larger map to the common size (mdistiller assumes equal
    sizes), then a conv (kernel ``k``, OFD's initialisation) and BatchNorm."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor, k: int = 1) -> None:
        super().__init__()
        self._size = common_spatial(s, t)
        dims = s.dim() - 2
        conv = _CONV[dims](s.shape[1], t.shape[1], k, 1, (k - 1) // 2, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k**dims * t.shape[1])))  # N(0, 2/(k^d·out)); BN 1 / 0
        self.layers = nn.Sequential(conv, _BN[dims](t.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(reduce_to(x, self._size))


class _ABConnector(nn.Module):
    """AB's student → teacher map on pre-activations, as RepDistiller's ``Connector`` / ``ConvReg`` (no ReLU): nothing
    when channels and size already agree; else a conv and BatchNorm whose geometry follows the sizes — 3×3 stride 2
    when the student's map is twice the teacher's, a 4×4 stride-2 transposed conv when it is half, a
    ``(1 + s − t)``-sized kernel when it is larger by another amount (1×1 for equal sizes). A student map smaller than
    the teacher's by another factor, which RepDistiller refuses, gets a 1×1 conv and the loss pools the teacher's map
    to its size."""

    def __init__(self, s: torch.Tensor, t: torch.Tensor) -> None:
        super().__init__()
        dims, (cs, ct) = s.dim() - 2, (s.shape[1], t.shape[1])
        s_size, t_size = tuple(s.shape[2:]), tuple(t.shape[2:])
        if cs == ct and s_size[0] == t_size[0]:
            self.layers: nn.Module = nn.Identity()
            return
        if all(a == 2 * b for a, b in zip(s_size, t_size)):
            layer: nn.Module = _CONV[dims](cs, ct, 3, 2, 1)
        elif all(2 * a == b for a, b in zip(s_size, t_size)):
            layer = _CONV_T[dims](cs, ct, 4, 2, 1)
        elif all(a >= b for a, b in zip(s_size, t_size)):
            layer = _CONV[dims](cs, ct, tuple(1 + a - b for a, b in zip(s_size, t_size)))
        else:
            layer = _CONV[dims](cs, ct, 1)
        self.layers = nn.Sequential(layer, _BN[dims](ct))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ABParams(_StageParams):
    feat_weight: float = Field(1.0, ge=0, description="weight of the AB loss (RepDistiller -b 1; scaled by 3/1000)")
    margin: float = Field(1.0, gt=0, description="margin μ of the activation boundary")
    init_epochs: int = Field(30, ge=1, description="pre-phase epochs of activation-boundary transfer (release 30)")
    init_lr: float | None = Field(None, gt=0, description="pre-phase learning rate; null: optim.lr (as released)")


@METHODS.register("ab")
class AB(_StageMethod):
    """Activation boundaries: for ``init_epochs`` pre-phase epochs the student's backbone and per-stage connectors
    learn the teacher's activation boundaries, ``feat_weight · 3/1000 · Σ_i 2^(i−n+1)·ab(conn_i(p_s), p_t)`` on the
    pre-activations (:func:`kdlab.losses.ab`); then the student trains on ``ce_weight·CE`` alone (RepDistiller), and
    the teacher is no longer run (``teacher_outputs`` becomes empty at the first main-phase step)."""

    Params = ABParams
    teacher_outputs = ("preacts",)
    pre_trains_student = True  # RepDistiller's init trains the connectors and the student's feature modules
    field = "preacts"
    vectors = True

    def __init__(self, params: ABParams) -> None:
        super().__init__(params)
        self.pre_epochs = params.init_epochs

    def pre_lr(self, lr: float) -> float:
        return self.params.init_lr or lr

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        s, t = last_aligned(as_maps(s_out.preacts), as_maps(t_out.preacts))
        self.connectors = nn.ModuleList(_ABConnector(a, b) for a, b in zip(s, t))
        self.connectors.to(s[0].device)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        if epoch > 0:
            self.teacher_outputs = ()  # the main phase reads no teacher: the engine stops running it from here on
            return _ce({}, p.ce_weight, student.logits, target)
        assert teacher is not None
        s_list, t_list = last_aligned(as_maps(student.preacts), as_maps(teacher.preacts))
        n = len(s_list)
        total = student.logits.new_zeros(())
        for i, (s, t, conn) in enumerate(zip(s_list, t_list, self.connectors)):
            s = conn(s)
            total = total + 2.0 ** (i - n + 1) * L.ab(s, reduce_to(t, tuple(s.shape[2:])), p.margin)
        return {"ab": p.feat_weight * total * 3 / 1000}


class OFDParams(_StageParams):
    feat_weight: float = Field(0.001, ge=0, description="weight of the OFD distance (mdistiller 0.001)")
    kernel_size: int = Field(1, ge=1, description="connector kernel size (odd)")


@METHODS.register("ofd")
class OFD(_StageMethod):
    """A comprehensive overhaul of feature distillation: ``ce_weight·CE + feat_weight·Σ_i ofd(conn_i(p_s),
    pool(p_t), m_i) / 2^(n−i−1)`` on the pre-activations, margins ``m_i`` from the teacher's BatchNorm before each
    stage ReLU (:func:`kdlab.losses.ofd_margin`; ``stage_norms`` of the teacher model)."""

    Params = OFDParams
    teacher_outputs = ("preacts",)
    field = "preacts"
    vectors = True

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        if self.params.kernel_size % 2 == 0:
            raise ConfigError(f"ofd: method.kernel_size must be odd, got {self.params.kernel_size}")
        norms = teacher.stage_norms()  # type: ignore[operator]
        if len(norms) != len(t_out.preacts):
            raise ConfigError(f"ofd: the teacher has {len(norms)} stage BatchNorms for {len(t_out.preacts)} stages")
        s, t = last_aligned(as_maps(s_out.preacts), as_maps(t_out.preacts))
        norms = norms[len(norms) - len(t) :]
        self.connectors = nn.ModuleList(
            _Connect(a, b, self.params.kernel_size) for a, b in zip(s, t)
        ).to(s[0].device)  # fmt: skip
        for i, (bn, feat) in enumerate(zip(norms, t)):
            margin = L.ofd_margin(bn.weight.detach(), bn.bias.detach())
            self.register_buffer(f"margin{i}", margin.reshape(1, -1, *([1] * (feat.dim() - 2))).to(feat.device))
        self._n = len(t)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            s_list, t_list = last_aligned(as_maps(student.preacts), as_maps(teacher.preacts))
            total = student.logits.new_zeros(())
            for i, (s, t, conn) in enumerate(zip(s_list, t_list, self.connectors)):
                s = conn(s)
                t = F.adaptive_avg_pool1d(t, s.shape[2]) if t.dim() == 3 else F.adaptive_avg_pool2d(t, s.shape[2:])
                total = total + L.ofd(s, t, getattr(self, f"margin{i}")) / 2 ** (self._n - i - 1)
            out["feature"] = p.feat_weight * total
        return _ce(out, p.ce_weight, student.logits, target)


# ---------------------------------------------------------------------------------------------------------------------
# ReviewKD


class ABF(nn.Module):
    """ReviewKD's attention-based fusion: 1×1 conv-BN to ``mid`` channels, fused with the upsampled residual of the
    deeper level by a 2-channel sigmoid attention, resized to the teacher's size, then 3×3 conv-BN to the teacher's
    channels. ``forward`` returns ``(output, residual for the next level)``."""

    def __init__(self, dims: int, cin: int, mid: int, cout: int, fuse: bool) -> None:
        super().__init__()
        conv, bn = _CONV[dims], _BN[dims]
        self.conv1 = nn.Sequential(conv(cin, mid, 1, bias=False), bn(mid))
        self.conv2 = nn.Sequential(conv(mid, cout, 3, 1, 1, bias=False), bn(cout))
        self.att_conv = nn.Sequential(conv(mid * 2, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            assert residual is not None
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:2]
        if tuple(x.shape[2:]) != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


class ReviewKDParams(_StageParams):
    feat_weight: float = Field(5.0, ge=0, description="weight of the HCL term (mdistiller CIFAR-100 recipe: 5)")
    warmup_epochs: int = Field(20, ge=0, description="the HCL weight ramps up linearly over these epochs")
    max_mid_channel: int = Field(512, ge=1, description="upper bound of the ABF width")
    stu_preact: bool = Field(False, description="fuse the student's pre-activations instead of its stage outputs")


def _as_map(pooled: torch.Tensor, dims: int) -> torch.Tensor:
    return pooled.reshape(*pooled.shape, *([1] * dims))


@METHODS.register("reviewkd")
class ReviewKD(_StageMethod):
    """Knowledge review: the student's stages and pooled vector, deepest first, are fused level by level by ABF
    modules and matched to the teacher's pre-activations and pooled vector with
    ``feat_weight · min(epoch / warmup_epochs, 1) · hcl`` (:func:`kdlab.losses.hcl`), next to ``ce_weight·CE``."""

    Params = ReviewKDParams
    teacher_outputs = ("preacts", "pooled")
    vectors = True

    def _student_levels(self, out: ModelOutput) -> list[torch.Tensor]:
        return list(as_maps(out.preacts if self.params.stu_preact else out.stages))

    def build(self, s_out: ModelOutput, t_out: ModelOutput, student: nn.Module, teacher: nn.Module) -> None:
        check_stages("ReviewKD", "teacher", teacher, t_out, "preacts", False)
        s, t = last_aligned(tuple(self._student_levels(s_out)), as_maps(t_out.preacts))
        dims = s[0].dim() - 2
        s = s + [_as_map(s_out.pooled, dims)]
        t = t + [_as_map(t_out.pooled, dims)]
        cin, cout = [f.shape[1] for f in s], [f.shape[1] for f in t]
        mid = min(self.params.max_mid_channel, cin[-1])
        abfs = [ABF(dims, ci, mid, co, i < len(cin) - 1) for i, (ci, co) in enumerate(zip(cin, cout))]
        self.abfs = nn.ModuleList(abfs[::-1]).to(s[0].device)  # deepest (pooled) level first
        self._out_sizes = [tuple(f.shape[2:]) for f in t[::-1]]
        self._n = len(s) - 1

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            levels = self._student_levels(student)[-self._n :]
            dims = levels[0].dim() - 2
            x = [_as_map(student.pooled, dims)] + levels[::-1]
            fused, residual = self.abfs[0](x[0], None, self._out_sizes[0])
            results = [fused]
            for feat, abf, size in zip(x[1:], self.abfs[1:], self._out_sizes[1:]):
                fused, residual = abf(feat, residual, size)
                results.insert(0, fused)
            targets = list(as_maps(teacher.preacts)[-self._n :]) + [_as_map(teacher.pooled, dims)]
            ramp = min(epoch / p.warmup_epochs, 1.0) if p.warmup_epochs else 1.0
            out["feature"] = p.feat_weight * ramp * L.hcl(results, targets)
        return _ce(out, p.ce_weight, student.logits, target)
