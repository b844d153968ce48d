"""An inference copy of a frozen model with its BatchNorms folded into the convolutions that feed them.

In eval mode ``BN(conv(x)) = γ·(W∗x + b − μ)/σ + β`` is one convolution with weights ``W·γ/σ`` and bias
``β + (b − μ)·γ/σ`` (σ = √(var + eps)), so a frozen teacher saves one pass over every activation map per BatchNorm
(resnet20 at batch 64 on the 2-core CPU: 33 → 27.5 ms per forward).

Which pairs may be folded is read from one forward pass of an example batch under a ``TorchFunctionMode`` that sees
every torch operation: a BatchNorm is folded only where its input is the output of a convolution that no other
operation reads, and each of the two modules runs once. This works for any model (zoo, ``forward_features`` with
shape-dependent branches, user models seen through forward hooks). The copy is then checked against the original
on the example batch (logits, pooled vector, stages, pre-activations); if anything differs, e.g. a forward hook reads
a folded convolution's output, the model is used unfolded.
"""

from __future__ import annotations

import copy
import inspect
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from kdlab.models.output import ModelOutput

_CONV_FUNCS = (F.conv1d, F.conv2d, F.conv3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_SIGNATURE = inspect.signature(F.batch_norm)


class FeaturesForward(nn.Module):
    """A module whose ``forward`` is ``model.forward_features`` (the form torch.compile wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.model.forward_features(x)  # type: ignore[operator]


class _Dataflow(TorchFunctionMode):
    """Records, for one forward pass, which tensor each convolution wrote, what each BatchNorm read, and how many
    operations read each tensor (every tensor is kept alive for the pass, so ``id`` is unique)."""

    def __init__(self, conv_of_weight: dict[int, str], bn_of_mean: dict[int, str]) -> None:
        super().__init__()
        self.conv_of_weight, self.bn_of_mean = conv_of_weight, bn_of_mean
        self.readers: Counter[int] = Counter()
        self.conv_output: dict[int, str] = {}  # tensor id → convolution that wrote it
        self.bn_input: list[tuple[str, int]] = []  # (BatchNorm, id of the tensor it normalised) in eval mode
        self.calls: Counter[str] = Counter()
        self._keep: list[Any] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self._keep += inputs + outputs
        if outputs:  # shape / size / dim queries read no data
            self.readers.update(id(t) for t in inputs)
        if func in _CONV_FUNCS and len(args) > 1 and id(args[1]) in self.conv_of_weight:
            name = self.conv_of_weight[id(args[1])]
            self.calls[name] += 1
            self.conv_output[id(out)] = name
        elif func is F.batch_norm:
            bound = _BN_SIGNATURE.bind(*args, **kwargs)
            name = self.bn_of_mean.get(id(bound.arguments.get("running_mean")))
            if name is not None:
                self.calls[name] += 1
                if not bound.arguments.get("training", False):
                    self.bn_input.append((name, id(bound.arguments["input"])))
        return out


def _named_slots(root: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, key, module)`` for every sub-module reachable through ``_modules``."""
    for key, child in root._modules.items():
        if child is None:
            continue
        name = f"{prefix}{key}"
        yield name, root, key, child
        yield from _named_slots(child, name + ".")


def foldable_pairs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """``(convolution, BatchNorm)`` names of ``model`` whose BatchNorm can be folded, read from one eval-mode forward
    of ``example``."""
    slots = list(_named_slots(model))
    convs = {id(m.weight): n for n, _, _, m in slots if type(m) in _CONVS and m.padding_mode == "zeros"}
    norms = {id(m.running_mean): n for n, _, _, m in slots
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None}  # fmt: skip
    flow = _Dataflow(convs, norms)
    with torch.no_grad(), flow:
        model.forward_features(example)  # type: ignore[operator]
    pairs = []
    for bn, tensor in flow.bn_input:
        conv = flow.conv_output.get(tensor)
        if conv is not None and flow.readers[tensor] == 1 and flow.calls[conv] == 1 and flow.calls[bn] == 1:
            pairs.append((conv, bn))
    return pairs


def fold_batchnorm(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int, str]:
    """``(forward, folded, why)``: a frozen copy of ``model`` whose ``forward`` gives ``model.forward_features`` with
    every foldable conv → BatchNorm pair folded, and the number of pairs; when nothing is folded (no pair, a forward
    that fails under the recording, outputs that differ on ``example``) the unchanged model behind
    :class:`FeaturesForward`, 0, and why. ``model`` is not modified; the copy's parameters need no gradients.
    """
    plain = FeaturesForward(model)
    was_training = model.training
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    try:
        pairs = foldable_pairs(frozen, example[:1])
    except Exception as err:  # noqa: BLE001 (a model the recording cannot follow runs unfolded)
        return plain, 0, f"forward not recordable ({type(err).__name__})"
    if not pairs:
        return plain, 0, "no convolution → BatchNorm pair"
    slots = {n: (parent, key, m) for n, parent, key, m in _named_slots(frozen)}
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, (parent, key, bn) = slots[conv_name][2], slots[bn_name]
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            parent._modules[key] = nn.Identity()
    folded = FeaturesForward(frozen)
    model.eval()
    try:
        same, why = _same_outputs(FeaturesForward(model), folded, example)
    finally:
        model.train(was_training)
    return (folded, len(pairs), "") if same else (plain, 0, why)


class BatchStatisticsNorm(nn.Module):
    """A frozen BatchNorm (any dimensionality) that always normalises with the statistics of the batch it is given,
    in training and eval mode alike, and keeps no running statistics: a teacher "in training mode" whose state never
    changes. Weight and bias are buffers copied from the BatchNorm it replaces."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.register_buffer("weight", None if bn.weight is None else bn.weight.detach().clone())
        self.register_buffer("bias", None if bn.bias is None else bn.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def batch_statistics_copy(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` with every BatchNorm replaced by :class:`BatchStatisticsNorm` (``model`` is not
    modified): the teacher of OFD's and WSLD's releases, which run it in training mode, without the running-statistic
    updates their ``teacher.train()`` also makes (nothing reads them during distillation)."""
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    for _, parent, key, module in list(_named_slots(frozen)):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            new = BatchStatisticsNorm(module)
            for hooks in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs"):
                getattr(new, hooks).update(getattr(module, hooks, {}))  # taps on a BatchNorm (user models) still fire
            parent._modules[key] = new
    return frozen


def frozen_features(
    model: nn.Module, example: torch.Tensor, fold_bn: bool = True, teacher_bn: str = "eval"
) -> tuple[nn.Module, str]:
    """The module that computes ``model.forward_features`` for a frozen forward, and a one-line description: with
    ``teacher_bn="train"`` a :func:`batch_statistics_copy` (nothing can be folded: the statistics change with every
    batch); else the folded copy of :func:`fold_batchnorm` when ``fold_bn`` and a pair folds, else ``model`` itself."""
    if teacher_bn == "train":
        return FeaturesForward(batch_statistics_copy(model)), "BatchNorms on each batch's statistics (not folded)"
    if not fold_bn:
        return FeaturesForward(model), "BatchNorm folding off"
    forward, folded, why = fold_batchnorm(model, example)
    return forward, f"{folded} BatchNorm(s) folded into convolutions" if folded else f"no BatchNorm folded: {why}"


def _same_outputs(ref_fn: nn.Module, got_fn: nn.Module, example: torch.Tensor) -> tuple[bool, str]:
    """Whether two forwards give the same :class:`ModelOutput` on ``example`` (to float32 rounding)."""
    try:
        with torch.no_grad():
            ref, got = ref_fn(example), got_fn(example)
    except Exception as err:  # noqa: BLE001
        return False, f"folded copy failed to run ({type(err).__name__})"
    if len(ref.stages) != len(got.stages) or len(ref.preacts) != len(got.preacts):
        return False, "folded copy gives other outputs"
    pairs: list[tuple[Any, Any]] = [(ref.logits, got.logits), (ref.pooled, got.pooled), (ref.prepool, got.prepool)]
    pairs += list(zip(ref.stages, got.stages)) + list(zip(ref.preacts, got.preacts))
    for a, b in pairs:
        if a is None and b is None:
            continue
        if a is None or b is None or a.shape != b.shape:
            return False, "folded copy gives other output shapes"
        if a.dtype.is_floating_point and a.numel():
            scale = a.abs().max().item() + 1e-6
            if not (a - b).abs().max().item() <= 1e-3 * scale:
                return False, "folded copy gives other outputs"
    return True, ""


__all__ = [
    "BatchStatisticsNorm", "FeaturesForward", "batch_statistics_copy", "fold_batchnorm", "foldable_pairs",
    "frozen_features",
]  # fmt: skip
