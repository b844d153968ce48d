"""Method base class: a small ``nn.Module`` that owns its learnable parts and returns named, weighted loss terms."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdlab.models.base import ModelOutput
from kdlab.registry import Registry


class MethodParams(BaseModel):
    """Base of every method's parameter schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


def teacher_bn_field() -> Any:
    """``method.teacher_bn`` of the methods whose releases run the teacher in training mode (OFD, WSLD)."""
    return Field("train", description="teacher BatchNorm during training: train = each batch's statistics, as the "
                 "release runs its teacher (running statistics are not updated; no teacher cache); eval = the "
                 "running statistics")  # fmt: skip


class Method(nn.Module):
    """A distillation (or plain training) objective.

    Subclasses define ``Params`` (a pydantic schema of their hyper-parameters), set ``needs_teacher`` and implement
    :meth:`losses`. Learnable parts (connectors, temperatures) are sub-modules and train with the student.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = True
    #: which teacher outputs ``losses`` reads (``logits``, ``pooled``, ``prepool``): a teacher cache must hold them
    teacher_outputs: ClassVar[tuple[str, ...]] = ("logits",)
    #: 2 for methods trained on a weak and a strong view of each sample (MLKD): ``losses`` then also receives
    #: ``strong=(student_output, teacher_output)`` of the strong view
    views: ClassVar[int] = 1
    #: True for methods whose ``losses`` take ``index=`` (the training-set indices of the batch, e.g. CRD's memory)
    needs_index: ClassVar[bool] = False
    #: buffers every rank keeps identical itself (e.g. CRD's memory, updated from all ranks' gathered batches):
    #: DistributedDataParallel must not broadcast them from rank 0 at every step
    ddp_local_buffers: ClassVar[tuple[str, ...]] = ()
    #: True for methods whose :meth:`bind_data` reads the training labels (CRD's other-class negatives); the engine
    #: only asks the data for them then (a user ``Dataset`` has to load every sample to know its labels)
    needs_train_labels: ClassVar[bool] = False

    #: epochs of a preliminary phase run before the main ``train.epochs`` (FT's paraphraser, AB's initialisation),
    #: inside the same run and checkpointed like any epoch: ``losses`` is then called with ``epoch`` = 1 − pre_epochs
    #: … 0 and the learning rate is :meth:`pre_lr` (phases are a function of the epoch)
    pre_epochs: int = 0
    #: whether the pre-phase trains the student's backbone (AB): it then runs in train mode; otherwise (FT) the student
    #: is in eval mode during the pre-phase, its BatchNorm statistics fixed (RepDistiller's ``init``: ``model_s.eval()``
    #: then ``train()`` on the modules being initialised)
    pre_trains_student: ClassVar[bool] = False
    #: the SGD settings of the pre-phase (``momentum``, ``nesterov``, ``weight_decay``) where the release trains it
    #: with an optimizer of its own (RepDistiller's ``init`` for FT and AB: plain momentum 0.9, weight decay 5e-4, on
    #: every parameter); ``None``: the run's optimizer settings (:func:`kdlab.engine.optim.set_epoch_hyperparameters`)
    pre_optim: dict[str, Any] | None = None
    #: how the frozen teacher's BatchNorms normalise during training: ``eval`` (running statistics) or ``train`` (each
    #: batch's own statistics, as OFD's and WSLD's releases run their teacher; the running statistics are never
    #: updated, and the teacher's reported accuracy is still its eval-mode one). A teacher cache replays ``eval`` only.
    teacher_bn: Literal["eval", "train"] = "eval"

    def __init__(self, params: MethodParams) -> None:
        super().__init__()
        self.params = params

    def pre_lr(self, lr: float) -> float:
        """The constant learning rate of the pre-phase epochs, given the run's base learning rate."""
        return lr

    def setup(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor) -> None:
        """Build parts whose shapes depend on the models (called once with an example batch)."""

    def bind_data(self, num_samples: int, labels: torch.Tensor | None) -> None:
        """Size (and, for methods with ``needs_train_labels``, labels) of the training set; called by the engine
        before :meth:`setup`."""

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int, **views: object
    ) -> dict[str, torch.Tensor]:
        """Named loss terms, already weighted; the training loss is their sum."""
        raise NotImplementedError

    def predict(self, student: ModelOutput) -> torch.Tensor:
        """Test-time logits (the student's own by default)."""
        return student.logits


METHODS: Registry[type[Method]] = Registry("method")
