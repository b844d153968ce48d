"""Feature-based methods and teacher-classifier reuse: FitNet, SRRL, SimKD, IJCKD, teacher_classifier.

All five connect the student's pre-pool feature to the teacher's with a connector (:mod:`kdlab.models.connectors`)
whose shape is inferred from one dry forward pass in :meth:`setup`. They differ in where the connector lives and how
the student predicts at test time:

=====================  ==========================  ===========================================================
method                 connector lives in          test-time prediction
=====================  ==========================  ===========================================================
``fitnet``, ``srrl``   the method (training only)  the student's own classifier
``simkd``, ``ijckd``,  the student's deployment    the frozen teacher classifier on the pooled connected feature
``teacher_classifier`` head (``kd_head``)          (:class:`kdlab.models.heads.ReusedClassifierHead`)
=====================  ==========================  ===========================================================

For the last three, :meth:`setup` attaches a head (connector + frozen copy of the teacher's classifier) to the
student, so the student's ``forward_features`` already returns the connected map as ``prepool`` and the reused
classifier's logits as ``logits``. The head is part of the student's state dict (``kd_head.*``): the distilled model
is saved, reloaded (:meth:`kdlab.models.base.HeadMixin.adapt_to_state_dict`) and evaluated alone, with no teacher.
The teacher classifier is a :class:`~kdlab.models.heads.FrozenLinear` (weights as buffers): no optimizer can update
it and no gradient accumulates in it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from kdlab.errors import ConfigError
from kdlab.losses import cross_entropy, kd
from kdlab.losses import feature as LF
from kdlab.methods.base import METHODS, Method, MethodParams
from kdlab.models.base import ModelOutput
from kdlab.models.connectors import ConnectorKind, HintConnectorKind, align_teacher, build_connector, conv_regressor
from kdlab.models.heads import FrozenLinear, ReusedClassifierHead


def dry_forward(model: nn.Module, example: torch.Tensor) -> ModelOutput:
    """One forward pass in eval mode without gradients (BatchNorm statistics untouched) to read feature shapes."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.forward_features(example)  # type: ignore[operator]
    finally:
        model.train(was_training)


def _teacher_classifier(teacher: nn.Module) -> FrozenLinear:
    classifier = getattr(teacher, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ConfigError(f"the teacher ({type(teacher).__name__}) exposes no final nn.Linear classifier to reuse")
    return FrozenLinear.copy_of(classifier)


def check_channels_first(out: ModelOutput, who: str, method: str) -> None:
    """Reject token-shaped (N×T×C, transformer) pre-pool features: feature methods read channel-first maps
    (N×C×L / N×C×H×W) or vectors. A 3-D feature whose last, not second, dimension is the pooled width is token-shaped."""
    f, d = out.prepool, out.pooled.shape[-1]
    if f.dim() == 3 and f.shape[1] != d and f.shape[2] == d:
        raise ConfigError(
            f"{method}: the {who}'s features are token-shaped {tuple(f.shape)} (N×T×C); feature methods "
            "need channel-first maps (N×C×H×W / N×C×L) or vectors: tap a convolutional module, or the pooled vector"
        )


class _ConnectorParams(MethodParams):
    connector: ConnectorKind = Field("1x1", description="connector: 1x1 | 1x1-1x1 | bottleneck | identity")
    factor: int = Field(2, ge=1, description="bottleneck connector: channel reduction factor")

    @model_validator(mode="after")
    def _some_weight(self) -> _ConnectorParams:
        weights = {k: v for k, v in self.model_dump().items() if k.endswith("_weight")}
        if weights and not any(weights.values()):
            raise ValueError(f"at least one of {', '.join(sorted(weights))} must be positive")
        return self


class _FeatureMethod(Method):
    """Shared setup: dry forward of both models, connector built from the features seen."""

    def _features(
        self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor
    ) -> tuple[ModelOutput, ModelOutput]:
        if teacher is None:
            raise ConfigError(f"method '{type(self).__name__}' needs a teacher")
        s_out, t_out = dry_forward(student, example), dry_forward(teacher, example)
        check_channels_first(s_out, "student", type(self).__name__)
        check_channels_first(t_out, "teacher", type(self).__name__)
        return s_out, t_out


class _HeadMethod(_FeatureMethod):
    """Methods whose student predicts through the frozen teacher classifier (SimKD, IJCKD, teacher_classifier)."""

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        if not hasattr(student, "attach_head"):
            raise ConfigError(f"student {type(student).__name__} cannot carry a reused classifier (not a kdlab model)")
        student.detach_head()  # type: ignore[operator]  # a fresh head for this run
        s_out, t_out = self._features(student, teacher, example)
        p = self.params
        connector = build_connector(p.connector, s_out.prepool, t_out.prepool, p.factor)  # type: ignore[attr-defined]
        classifier = _teacher_classifier(teacher).to(example.device)  # type: ignore[arg-type]
        student.attach_head(ReusedClassifierHead(connector, classifier))  # type: ignore[operator]
        # The student's own classifier no longer takes part in the loss: freeze it, so that neither the optimizer
        # nor DistributedDataParallel waits for gradients that never come.
        student.own_classifier.requires_grad_(False)  # type: ignore[union-attr]
        self._reused = [classifier]  # a list, so that it is not registered (and saved) as a part of the method

    def predict(self, student: ModelOutput) -> torch.Tensor:
        """Test-time logits: the frozen teacher classifier on the pooled connected feature (the head's output)."""
        return student.logits


# ---------------------------------------------------------------------------------------------------------------------


class FitNetParams(_ConnectorParams):
    connector: HintConnectorKind = Field(
        "convreg", description="regressor: convreg (the releases' ConvReg: kernel / stride / transposed conv map the "
        "student's map onto the teacher's size) | 1x1 | 1x1-1x1 | bottleneck | identity (pool the larger map)",
    )  # fmt: skip
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term")
    feat_weight: float = Field(100.0, ge=0, description="weight β of the hint (feature MSE) term")
    hint_layer: int | None = Field(
        2, ge=1, description="hint: stage k's output of both models (RepDistiller / mdistiller HINT_LAYER 2, counting "
        "the stem as 0: the second stage); null: the pre-pool map",
    )  # fmt: skip


@METHODS.register("fitnet")
class FitNet(_FeatureMethod):
    """FitNets: ``ce_weight · CE + feat_weight · MSE(regressor(f_s), f_t)`` on the hint maps.

    As released (RepDistiller ``--hint_layer 2``, mdistiller ``HINT_LAYER: 2``), the hint is the output of stage 2 of
    both models (:attr:`ModelOutput.stages`; ``hint_layer = k`` for stage k, ``null`` for the pre-pool feature), and
    the regressor is the releases' ``ConvReg`` (:func:`kdlab.models.connectors.conv_regressor`): it maps the
    student's map onto the teacher's size — a ShuffleNet's 8×8 stage-2 map is upsampled by a transposed convolution to
    a ResNet teacher's 16×16 — where kdlab's other connectors pool the larger map. The regressor trains with the
    student and is dropped at test time. Defaults as in RepDistiller / mdistiller (CE 1, hint 100).
    """

    Params = FitNetParams
    teacher_outputs = ("stages",)

    def __init__(self, params: FitNetParams) -> None:
        super().__init__(params)
        if params.hint_layer is None:
            self.teacher_outputs = ("prepool",)

    def _hint(self, out: ModelOutput) -> torch.Tensor:
        k = self.params.hint_layer
        return out.prepool if k is None else out.stages[k - 1]

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        p = self.params
        k = p.hint_layer
        for who, out in (("student", s_out), ("teacher", t_out)):
            if k is not None and k > len(out.stages):
                raise ConfigError(
                    f"fitnet: method.hint_layer={k} but the {who} exposes {len(out.stages)} stage(s); set "
                    "method.hint_layer=null for the pre-pool feature, or name the model's stages (features: [...])"
                )
        s_hint, t_hint = self._hint(s_out), self._hint(t_out)
        if p.connector == "convreg":
            self.connector: nn.Module = conv_regressor(s_hint, t_hint)
        else:
            self.connector = build_connector(p.connector, s_hint, t_hint, p.factor)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight:
            s = self.connector(self._hint(student))
            out["feature"] = p.feat_weight * LF.fitnet(s, align_teacher(self._hint(teacher), s))
        if p.ce_weight:
            out["ce"] = p.ce_weight * cross_entropy(student.logits, target)
        return out


class SRRLParams(_ConnectorParams):
    variant: Literal["paper", "simkd_repo"] = Field(
        "paper", description="paper: connector on the pre-pool map (SRRL paper); simkd_repo: connector on the pooled "
        "vector plus a KD term, as the SimKD repository's SRRL",
    )  # fmt: skip
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy term (student's own classifier)")
    feat_weight: float = Field(1.0, ge=0, description="weight of the pooled-feature MSE term")
    logit_weight: float = Field(1.0, ge=0, description="weight α of the softmax-regression (logit MSE) term")
    kd_weight: float | None = Field(
        None, ge=0, description="weight of the KD term (default: 0 for paper, 1 for simkd_repo)"
    )
    temperature: float = Field(4.0, gt=0, description="KD temperature (simkd_repo: 4)")


@METHODS.register("srrl")
class SRRL(_FeatureMethod):
    """SRRL (ideal-joint-classifier-kd Eq. 6/8, Algorithm 1): CE on the student's own logits + pooled feature MSE +
    MSE between the frozen teacher classifier on the connected student feature and the teacher's logits.

    ``variant="simkd_repo"`` is the SRRL of the SimKD repository: the connector (1×1 conv-BN-ReLU on a 1×1 map, i.e.
    Linear-BN-ReLU) acts on the pooled vector, and a KD term (T = 4, weight 1) is added to CE and the two MSEs.

    The student keeps and is evaluated with its own classifier; the connector and the frozen teacher classifier
    belong to the method (training only).
    """

    Params = SRRLParams
    teacher_outputs = ("logits", "prepool")

    def __init__(self, params: SRRLParams) -> None:
        super().__init__(params)
        self._pooled = params.variant == "simkd_repo"
        self._kd_weight = params.kd_weight if params.kd_weight is not None else (1.0 if self._pooled else 0.0)
        if self._pooled:
            self.teacher_outputs = ("logits", "pooled")

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        s_out, t_out = self._features(student, teacher, example)
        p = self.params
        field = "pooled" if self._pooled else "prepool"
        self.connector = build_connector(p.connector, getattr(s_out, field), getattr(t_out, field), p.factor)
        self.teacher_classifier = _teacher_classifier(teacher).to(example.device)  # type: ignore[arg-type]

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        out = {}
        if p.feat_weight or p.logit_weight:
            s = self.connector(student.pooled if self._pooled else student.prepool)
            t = teacher.pooled if self._pooled else teacher.prepool
            feature, logit = LF.srrl(s, t, self.teacher_classifier, teacher.logits)
            if p.feat_weight:
                out["feature"] = p.feat_weight * feature
            if p.logit_weight:
                out["logit"] = p.logit_weight * logit
        if self._kd_weight:
            out["kd"] = self._kd_weight * kd(student.logits, teacher.logits, p.temperature)
        if p.ce_weight:
            out["ce"] = p.ce_weight * cross_entropy(student.logits, target)
        return out


class SimKDParams(_ConnectorParams):
    connector: ConnectorKind = Field("bottleneck", description="student→teacher connector (SimKD: bottleneck)")
    feat_weight: float = Field(1.0, ge=0, description="weight of the feature MSE term")


@METHODS.register("simkd")
class SimKD(_HeadMethod):
    """SimKD (ideal-joint-classifier-kd Algorithm 2): feature MSE only; the student predicts through the frozen
    teacher classifier applied to its pooled connected feature. No label is used."""

    Params = SimKDParams
    teacher_outputs = ("prepool",)

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        assert teacher is not None
        target_feat = align_teacher(teacher.prepool, student.prepool)
        return {"feature": self.params.feat_weight * LF.simkd(student.prepool, target_feat)}


class IJCKDParams(_ConnectorParams):
    ce_weight: float = Field(1.0, ge=0, description="α_ce: weight of CE through the teacher classifier")
    logit_weight: float = Field(1.0, ge=0, description="α: weight of the logit MSE (softmax regression) term")
    feat_weight: float = Field(0.0, ge=0, description="β: weight of the feature MSE term")


@METHODS.register("ijckd")
class IJCKD(_HeadMethod):
    """IJCKD (ideal-joint-classifier-kd Eq. 8, Algorithm 3), with the frozen teacher classifier as ĝ:
    ``α_ce·CE(ĝ∘Φ_s) + α·MSE(ĝ∘Φ_s, o^t) + β·MSE(f_s, f_t)``; predicts like SimKD. Defaults α_ce = α = 1, β = 0."""

    Params = IJCKDParams
    teacher_outputs = ("logits", "prepool")

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        p = self.params
        assert teacher is not None
        terms = LF.ijckd(student.prepool, align_teacher(teacher.prepool, student.prepool), self._reused[0],
                         teacher.logits, target)  # fmt: skip
        weights = {"ce": p.ce_weight, "logit": p.logit_weight, "feature": p.feat_weight}
        return {k: w * terms[k] for k, w in weights.items() if w}


class TeacherClassifierParams(_ConnectorParams):
    ce_weight: float = Field(1.0, gt=0, description="weight of the cross-entropy term")


@METHODS.register("teacher_classifier")
class TeacherClassifier(_HeadMethod):
    """The student trained on labels alone (CE) through the frozen teacher classifier (ideal-joint-classifier-kd §4.5,
    Table 5). The teacher is used only for its classifier."""

    Params = TeacherClassifierParams
    teacher_outputs = ()  # the teacher is used only for its classifier, at setup

    def losses(self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int):
        return {"ce": self.params.ce_weight * cross_entropy(student.logits, target)}
