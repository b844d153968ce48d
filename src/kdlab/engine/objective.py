"""What one training step computes: the student and the method as one module, and the check that they fit the data.

:class:`Objective` is what the engine differentiates (and what DistributedDataParallel wraps, so the gradients of
the student and of the method's own parameters — connectors, learnable temperatures — are synchronised together).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdlab.data import DataSource
from kdlab.errors import ConfigError
from kdlab.methods import Method
from kdlab.models import ModelOutput


def select_device(name: str) -> torch.device:
    """``train.device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (a one-line error when CUDA
    is asked for and missing)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    return dev


def features(model: nn.Module, x: torch.Tensor) -> ModelOutput:
    """The one model interface (``forward_features``) of a zoo or tapped user model."""
    return model.forward_features(x)  # type: ignore[operator]


class Objective(nn.Module):
    """Student + method as one module, so that DistributedDataParallel syncs the gradients of both."""

    def __init__(self, student: nn.Module, method: Method, forward: Callable | None = None) -> None:
        super().__init__()
        self.student = student
        self.method = method
        # the student's forward_features, compiled on the fast path; the method's losses (which may read the Python
        # int epoch) stay outside the compiled graph, so a new epoch never recompiles
        self._forward = forward or student.forward_features
        # buffers each rank keeps in sync itself (CRD's memory): DistributedDataParallel leaves them alone
        self._ddp_params_and_buffers_to_ignore = [f"method.{n}" for n in method.ddp_local_buffers]

    def forward(
        self, x: torch.Tensor, teacher: ModelOutput | None, target: torch.Tensor, epoch: int,
        x_strong: torch.Tensor | None = None, teacher_strong: ModelOutput | None = None,
        index: torch.Tensor | None = None,
    ) -> tuple[ModelOutput, dict[str, torch.Tensor]]:  # fmt: skip
        s_out = self._forward(x)
        extra: dict[str, object] = {"index": index} if self.method.needs_index else {}
        if x_strong is None:
            return s_out, self.method.losses(s_out, teacher, target, epoch, **extra)
        strong = (self._forward(x_strong), teacher_strong)  # separate forwards, as two-view methods do
        return s_out, self.method.losses(s_out, teacher, target, epoch, strong=strong, **extra)


def check_model_fits_data(model: nn.Module, example: torch.Tensor, data: DataSource, what: str) -> None:
    """One forward of an example batch before anything is written: a model that cannot read the data's inputs
    (image data for a 1-D model, wrong channel count) or predicts another number of classes is a one-line error."""
    was_training = model.training
    model.eval()  # no running-statistics update, no dropout draw: the run is unchanged by this check
    try:
        with torch.no_grad():
            logits = features(model, example).logits
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{what} does not accept the inputs of dataset '{data.name}' (one sample: shape "
            f"{list(example.shape[1:])}, {str(example.dtype).removeprefix('torch.')}): {first}"
        ) from None
    finally:
        model.train(was_training)
    if logits.ndim != 2 or logits.shape[1] != data.num_classes:
        raise ConfigError(f"{what} predicts logits of shape {list(logits.shape[1:])} per sample but dataset "
                          f"'{data.name}' has {data.num_classes} classes")  # fmt: skip
