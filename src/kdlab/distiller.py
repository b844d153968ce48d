"""``kdlab.Distiller``: any kdlab method inside your own training loop.

It does for a user's loop what ``kdlab distill`` does for its own: sees both models through kdlab's model interface
(zoo models as they are, any other ``nn.Module`` by forward hooks on the modules you name, as ``model.classifier`` /
``model.features`` do in a config), builds the method's learnable parts (connectors, temperatures) from the first
batch, runs the frozen teacher without gradients, and returns the method's named loss terms::

    import kdlab

    distiller = kdlab.Distiller(student, teacher, method="kd", temperature=4, ce_weight=0.1, kd_weight=0.9,
                                student_taps={"classifier": "fc"}, teacher_taps={"classifier": "head"})
    distiller.setup(first_x)                                 # builds connectors (only needed before parameters())
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.05, momentum=0.9)
    for x, y in loader:
        step = distiller(x, y)                               # step.loss, step.terms {"ce": …, "kd": …}, step.logits
        print(step.numbers())                                # the terms and the loss as floats
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
    logits = distiller.predict(x_test)                       # the method's test-time prediction

``parameters()`` is everything that trains: the student's weights and the method's (connector, learnable
temperature, a SimKD/IJCKD head); never the teacher's. Method parameters are the same keys as ``method.<param>`` in
a config (``kdlab keys``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods import Method, build_method
from kdlab.models.base import ModelOutput
from kdlab.models.fold import batch_statistics_copy
from kdlab.models.taps import TappedModel


class DistillStep(NamedTuple):
    """What :meth:`Distiller.forward` returns: the training loss (sum of the terms), the named weighted terms
    (``{"ce": …, "kd": …}``, as logged in metrics.jsonl without the ``train_`` prefix) and the student's logits."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor

    def numbers(self) -> dict[str, float]:
        """The terms and the loss as Python floats (one host transfer), for logging."""
        names = [*self.terms, "loss"]
        values = torch.stack([t.detach().float().reshape(()) for t in (*self.terms.values(), self.loss)]).tolist()
        return dict(zip(names, values))


def as_kdlab_model(model: nn.Module, taps: Mapping[str, str] | None = None, role: str = "student") -> nn.Module:
    """``model`` seen through kdlab's interface: zoo models unchanged, others wrapped in a :class:`TappedModel`.

    ``taps`` names module paths: ``classifier`` (the final ``nn.Linear``) and optionally ``features`` (the pre-pool
    map). Without ``taps``, the last ``nn.Linear`` in ``model.named_modules()`` is the classifier.
    """
    if taps is None and hasattr(model, "forward_features"):
        return model
    taps = dict(taps or {})
    unknown = set(taps) - {"classifier", "features"}
    if unknown:
        raise ConfigError(f"{role}_taps: unknown key(s) {', '.join(sorted(unknown))}; use classifier and features")
    if "classifier" not in taps:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
        if not linears:
            raise ConfigError(f"{role}: {type(model).__name__} has no nn.Linear; name its classifier in {role}_taps")
        taps["classifier"] = linears[-1]
    return TappedModel(model, taps["classifier"], taps.get("features"))


class Distiller(nn.Module):
    """Student + method of a distillation, for a training loop of your own (see the module docstring).

    ``method`` is a name of :data:`kdlab.methods.METHODS` (``kdlab keys`` lists each one's parameters, passed
    here as keyword arguments). The teacher is frozen, kept in eval mode, moved with ``.to()`` and not part of
    :meth:`parameters` or :meth:`state_dict`; methods with ``teacher_bn="train"`` (OFD, WSLD, as released) read a
    copy made here whose BatchNorms normalise with each batch's statistics. Methods with a memory of the training set (CRD) need ``num_samples``
    (and ``train_labels`` for class-aware negatives) and an ``index=`` per batch; two-view methods (MLKD) an
    ``x_strong=`` batch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        method: str = "kd",
        *,
        student_taps: Mapping[str, str] | None = None,
        teacher_taps: Mapping[str, str] | None = None,
        num_samples: int | None = None,
        train_labels: torch.Tensor | None = None,
        **params: Any,
    ) -> None:
        super().__init__()
        from pydantic import ValidationError

        from kdlab.config import _first_error

        from kdlab.methods import METHODS

        cls = METHODS.get(method)
        try:
            self.method: Method = build_method(method, params)
        except ValidationError as err:
            raise ConfigError(f"Distiller(method='{method}'): {_first_error(err, model=cls.Params)}") from None
        if self.method.needs_teacher and teacher is None:
            raise ConfigError(f"method '{method}' needs a teacher")
        self.student = as_kdlab_model(student, student_taps, "student")
        self._teacher = (None if teacher is None else as_kdlab_model(teacher, teacher_taps, "teacher"),)
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        if getattr(self.method, "needs_index", False) and num_samples is None:
            raise ConfigError(f"method '{method}' keeps a memory of the training set: pass num_samples=len(train_set)")
        if num_samples is not None:
            self.method.bind_data(num_samples, train_labels)  # type: ignore[attr-defined]
        self.method_name = method
        self._ready = False
        # methods whose release runs the teacher's BatchNorms on batch statistics (method.teacher_bn=train: OFD, WSLD)
        # read a frozen copy that does so (kdlab.models.fold.batch_statistics_copy); not registered, not saved
        self._batch_stat_teacher: tuple[nn.Module, ...] = ()
        if self.teacher is not None and self.method.teacher_bn == "train":
            self._batch_stat_teacher = (batch_statistics_copy(self.teacher),)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (through kdlab's interface), or ``None`` for methods without one."""
        return self._teacher[0]

    def _apply(self, fn: Any, recurse: bool = True) -> Distiller:  # .to() / .cuda() / .half() move the teacher too
        super()._apply(fn, recurse)
        for module in (self.teacher, *self._batch_stat_teacher):
            if module is not None:
                module._apply(fn)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def setup(self, example: torch.Tensor) -> Distiller:
        """Build the method's shape-dependent parts (connectors) from an example batch; done once, on the first
        :meth:`forward` if not called before. Call it before :meth:`parameters` for methods with connectors."""
        if not self._ready:
            self.method.setup(self.student, self.teacher, example)
            self.method.to(example.device)
            self._ready = True
        return self

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Everything that trains (student + method), for the optimizer; never the teacher's weights."""
        if not self._ready and type(self.method).setup is not Method.setup:
            raise ConfigError(
                f"method '{self.method_name}' builds parts from the data: call distiller.setup(first_batch_x) "
                "before distiller.parameters()"
            )
        return super().parameters(recurse)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> ModelOutput | None:
        """The frozen teacher's outputs for ``x`` (``None`` when the method reads no teacher)."""
        if self.teacher is None or not self.method.needs_teacher or not self.method.teacher_outputs:
            return None
        teacher = self._batch_stat_teacher[0] if self._batch_stat_teacher else self.teacher
        return teacher.forward_features(x)  # type: ignore[operator]

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epoch: int = 1,
        index: torch.Tensor | None = None,
        x_strong: torch.Tensor | None = None,
        teacher: ModelOutput | None = None,
    ) -> DistillStep:
        """One training step's losses for the batch ``(x, y)``: the student forward, the teacher forward (or the
        given ``teacher`` outputs, e.g. from a cache) and the method's named terms. ``epoch`` (1-based) matters to
        methods with warm-ups or phases."""
        self.setup(x)
        s_out = self.student.forward_features(x)  # type: ignore[operator]
        t_out = teacher if teacher is not None else self.teacher_outputs(x)
        extra: dict[str, Any] = {}
        if self.method.views == 2:
            if x_strong is None:
                raise ConfigError(f"method '{self.method_name}' trains on two views: pass x_strong=")
            extra["strong"] = (self.student.forward_features(x_strong), self.teacher_outputs(x_strong))  # type: ignore[operator]
        if getattr(self.method, "needs_index", False):
            if index is None:
                raise ConfigError(f"method '{self.method_name}' needs index= (the batch's training-set indices)")
            extra["index"] = index
        terms = self.method.losses(s_out, t_out, y, epoch, **extra)
        loss = sum(terms.values())
        assert isinstance(loss, torch.Tensor)
        return DistillStep(loss, terms, s_out.logits)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time logits of the student (through the teacher's classifier for SimKD / IJCKD); call
        ``distiller.eval()`` first, as for any model."""
        return self.method.predict(self.student.forward_features(x))  # type: ignore[operator]
