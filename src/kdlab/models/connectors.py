"""Connectors: small learnable maps from the student's feature space to the teacher's.

Four kinds (ideal-joint-classifier-kd §4.2, Table 2), each a sequence of *blocks* "bias-free layer → BN → ReLU":

===============  =====================================================  ==========================================
kind             feature maps (N×C×H×W or N×C×L)                         vector features (N×D)
===============  =====================================================  ==========================================
``1x1``          conv1×1(C_s→C_t)                                       Linear(D_s→D_t)
``1x1-1x1``      conv1×1(C_s→C_t), conv1×1(C_t→C_t)                     Linear(D_s→D_t), Linear(D_t→D_t)
``bottleneck``   conv1×1(C_s→C_t/f), conv3×3(C_t/f→C_t/f), conv1×1(→C_t)  the same with Linear layers
``identity``     nothing (channels must already match)                  nothing
===============  =====================================================  ==========================================

``bottleneck`` is SimKD's projector with reduction factor ``f`` (default 2). Shapes come from one dry forward pass
(:func:`build_connector` takes the student's and the teacher's feature tensors). When the student's and teacher's maps
differ in spatial size, the larger one is adaptive-average-pooled to the smaller: the connector pools the student
*before* its layers (as SimKD's code does), :func:`align_teacher` pools the teacher. When either side is a vector, or
the maps have a different number of spatial dimensions, both are reduced to vectors by global average pooling.

A connector is fully described by its state dict (layer shapes plus the ``target`` buffer holding the teacher's
spatial size), so :meth:`Connector.from_state` rebuilds it from a weights file alone.

:func:`conv_regressor` is the other geometry, the releases' hint regressor (RepDistiller / mdistiller ``ConvReg``):
instead of pooling, its convolution's kernel and stride map the student's map onto the teacher's size, upsampling a
student map half the teacher's size with a transposed convolution. FitNet (kind ``convreg``) and AB use it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from kdlab.errors import ConfigError
from kdlab.models.output import global_pool

ConnectorKind = Literal["1x1", "1x1-1x1", "bottleneck", "identity"]
KINDS: tuple[str, ...] = ("1x1", "1x1-1x1", "bottleneck", "identity")
#: the connectors of a hint (FitNet): the releases' ``convreg`` or one of :data:`KINDS`
HintConnectorKind = Literal["convreg", "1x1", "1x1-1x1", "bottleneck", "identity"]

_LAYER = {0: nn.Linear, 1: nn.Conv1d, 2: nn.Conv2d}
_LAYER_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
_NORM = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}


def _block(spatial_dims: int, cin: int, cout: int, k: int = 1) -> nn.Sequential:
    """Bias-free layer (Linear, or conv with kernel ``k`` and 'same' padding) → BN → ReLU."""
    if spatial_dims == 0:
        layer: nn.Module = nn.Linear(cin, cout, bias=False)
    else:
        layer = _LAYER[spatial_dims](cin, cout, k, padding=k // 2, bias=False)
    return nn.Sequential(layer, _NORM[spatial_dims](cout), nn.ReLU(inplace=True))


def _pool_to(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if len(size) == 1:
        return F.adaptive_avg_pool1d(x, size)
    if len(size) == 2:
        return F.adaptive_avg_pool2d(x, size)
    return F.adaptive_avg_pool3d(x, size)


def common_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[int, ...] | None:
    """The spatial size both features are compared at (``None``: as vectors).

    Vectors if either side is a vector or their numbers of spatial dimensions differ; otherwise the element-wise
    smaller size (the larger map is pooled to it).
    """
    if student.dim() == 2 or teacher.dim() == 2 or student.dim() != teacher.dim():
        return None
    return tuple(min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:]))


def reduce_to(x: torch.Tensor, size: tuple[int, ...] | None) -> torch.Tensor:
    """Pool ``x`` to the spatial ``size`` (``None``: global average to a vector); a no-op when it already fits."""
    if size is None:
        return global_pool(x)
    if tuple(x.shape[2:]) == size:
        return x
    return _pool_to(x, size)


def align_teacher(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """The teacher feature pooled to the (connected) student feature's size (Connectors: larger → smaller)."""
    if student.dim() == 2:
        return global_pool(teacher)
    if teacher.dim() != student.dim():
        raise ValueError(f"cannot align teacher feature {tuple(teacher.shape)} with student {tuple(student.shape)}")
    return reduce_to(teacher, tuple(student.shape[2:]))


class Connector(nn.Module):
    """Student feature → teacher feature space; see the module docstring for the kinds and the pooling rule.

    ``target`` (a persistent int64 buffer) holds the spatial size the student map is pooled to when it is larger
    (empty: the connector works on vectors).
    """

    def __init__(self, blocks: list[nn.Module], target: tuple[int, ...] | None) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.register_buffer("target", torch.tensor(list(target or ()), dtype=torch.long))
        self._size: tuple[int, ...] | None = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(reduce_to(x, self._size))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._size = tuple(int(v) for v in self.target.tolist()) or None

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str = "") -> Connector:
        """Rebuild a connector from its state dict (keys under ``prefix``) without any model at hand."""
        if f"{prefix}target" not in state:
            raise ValueError(f"no connector under '{prefix}' in the state dict")
        target = tuple(int(v) for v in state[f"{prefix}target"].tolist()) or None
        blocks: list[nn.Module] = []
        i = 0
        while f"{prefix}blocks.{i}.0.weight" in state:
            w = state[f"{prefix}blocks.{i}.0.weight"]
            spatial = w.dim() - 2
            blocks.append(_block(spatial, w.shape[1], w.shape[0], w.shape[-1] if spatial else 1))
            i += 1
        return cls(blocks, target)

    def extra_repr(self) -> str:
        return f"target={self._size if self._size is not None else 'vector'}"


def build_connector(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, factor: int = 2
) -> Connector:
    """A connector of ``kind`` mapping features shaped like ``student`` onto features shaped like ``teacher``.

    ``student`` / ``teacher`` are example feature tensors (N×C×… maps or N×D vectors) from a dry forward pass.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown connector '{kind}'; choose from: {', '.join(KINDS)}")
    size = common_spatial(student, teacher)
    dims = 0 if size is None else len(size)
    if dims > 2:
        raise ConfigError(f"connectors support 1-D and 2-D feature maps, got {tuple(student.shape)}")
    cs, ct = student.shape[1], teacher.shape[1]
    if kind == "identity":
        if cs != ct:
            raise ConfigError(f"connector 'identity' needs equal widths, got student {cs} and teacher {ct}")
        blocks: list[nn.Module] = []
    elif kind == "1x1":
        blocks = [_block(dims, cs, ct)]
    elif kind == "1x1-1x1":
        blocks = [_block(dims, cs, ct), _block(dims, ct, ct)]
    else:
        if factor < 1 or ct // factor < 1:
            raise ConfigError(f"connector factor {factor} leaves no channels for a teacher width of {ct}")
        mid = ct // factor
        blocks = [_block(dims, cs, mid), _block(dims, mid, mid, 3), _block(dims, mid, ct)]
    return Connector(blocks, size).to(student.device)


def conv_regressor(student: torch.Tensor, teacher: torch.Tensor, relu: bool = True) -> nn.Module:
    """The releases' hint regressor (RepDistiller / mdistiller ``ConvReg``): one convolution whose geometry maps the
    student's map onto the teacher's spatial size, then BatchNorm and, with ``relu``, a ReLU. Per spatial dimension,
    with student size s and teacher size t:

    * s = 2t: a 3×3 convolution, stride 2, padding 1;
    * 2s = t: a 4×4 transposed convolution, stride 2, padding 1 (the student's map is upsampled, e.g. ShuffleNet's
      8×8 stage-2 map onto a ResNet's 16×16);
    * s ≥ t otherwise: a valid convolution of kernel 1 + s − t (1×1 for equal sizes);
    * a student map smaller by another factor, which the releases refuse: a 1×1 convolution, and the loss pools the
      teacher's map to the student's size (:func:`align_teacher`).

    The convolution has a bias, as released (the BatchNorm after it cancels it in training mode). Vector features, or
    maps with different numbers of spatial dimensions, get the ``1x1`` connector (Linear → BN → ReLU on pooled
    vectors). ``student`` / ``teacher`` are example features from a dry forward pass.
    """
    dims = student.dim() - 2
    if dims < 1 or teacher.dim() != student.dim():
        return build_connector("1x1", student, teacher)
    if dims > 2:
        raise ConfigError(f"connectors support 1-D and 2-D feature maps, got {tuple(student.shape)}")
    cs, ct = student.shape[1], teacher.shape[1]
    pairs = list(zip(student.shape[2:], teacher.shape[2:]))
    if all(s == 2 * t for s, t in pairs):
        layer: nn.Module = _LAYER[dims](cs, ct, 3, 2, 1)
    elif all(2 * s == t for s, t in pairs):
        layer = _LAYER_T[dims](cs, ct, 4, 2, 1)
    elif all(s >= t for s, t in pairs):
        layer = _LAYER[dims](cs, ct, tuple(1 + s - t for s, t in pairs))
    else:
        layer = _LAYER[dims](cs, ct, 1)
    mods = [layer, _NORM[dims](ct)] + ([nn.ReLU(inplace=True)] if relu else [])
    return nn.Sequential(*mods).to(student.device)
