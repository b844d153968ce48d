"""The fast path of a run on its device: memory format, autocast, gradient scaling, cudnn autotuning, compile.

Everything here only changes how fast the same computation runs (and, with autocast, its precision); it never
changes what is computed. Training, evaluation and the teacher forward all go through it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from kdlab.config import TrainConfig
from kdlab.models.fold import FeaturesForward, frozen_features
from kdlab.models.output import ModelOutput

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp=auto``: bf16 on CUDA, none (float32) on every other device."""
    if amp != "auto":
        return amp
    return "bf16" if device.type == "cuda" else "none"


def resolve_compile_mode(mode: str, device: torch.device) -> str:
    """``train.compile_mode=auto``: CUDA graphs (``reduce-overhead``) on CUDA, inductor's default elsewhere."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" else "default"


class FastPath:
    """Per-run speed settings derived from ``cfg.train`` and the device."""

    def __init__(self, cfg: TrainConfig, device: torch.device, example: torch.Tensor) -> None:
        self.device = device
        # NHWC for image models, by default on CUDA and CPU (oneDNN: 1.45x the NCHW training step of resnet8 in CPU
        # time on the 2-core bench machine; kdlab's augmented batches already come out NHWC)
        default_cl = device.type in ("cuda", "cpu")
        self.channels_last = default_cl if cfg.channels_last is None else cfg.channels_last
        self.channels_last = bool(self.channels_last and example.dim() == 4)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp = resolve_amp(cfg.amp, device)
        self.amp_dtype = AMP_DTYPES.get(self.amp)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == "fp16" else None
        self.compile = cfg.compile
        self.compile_mode = resolve_compile_mode(cfg.compile_mode, device)

    def autocast(self) -> AbstractContextManager:
        """The autocast context of the run (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare(self, *modules: nn.Module | None) -> None:
        """Move modules to the run's memory format."""
        if self.channels_last:
            for m in modules:
                if m is not None:
                    m.to(memory_format=torch.channels_last)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """An input batch in the run's memory format (a no-op when it already is, as augmented batches are)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def frozen_forward(
        self, module: nn.Module, example: torch.Tensor, fold_bn: bool = True, teacher_bn: str = "eval"
    ) -> tuple[Callable[[torch.Tensor], ModelOutput], str]:
        """The run's forward of a frozen module (the teacher): ``module.forward_features`` computed by a copy with
        every BatchNorm folded into the convolution feeding it (``fold_bn``, where the recorded forward shows it is
        safe: :func:`kdlab.models.fold.frozen_features`), with weights stored in the autocast dtype under bf16/fp16
        (autocast would otherwise re-cast the float32 weights on every forward), in the run's memory format, compiled
        when on. ``module``'s weights are never changed; without
        folding and in float32 they are the ones used. ``teacher_bn="train"``: BatchNorms on each batch's statistics
        (a copy, never folded; ``method.teacher_bn``). Returns the forward and a one-line description."""
        forward, note = frozen_features(module, example, fold_bn, teacher_bn)
        if self.amp_dtype is not None:
            if isinstance(forward, FeaturesForward) and forward.model is module:
                forward = FeaturesForward(copy.deepcopy(module))
            forward = forward.to(self.amp_dtype).eval().requires_grad_(False)
            note += f", weights in {self.amp}"
        self.prepare(forward)
        return self.maybe_compile(forward), note

    def maybe_compile(self, fn: Callable) -> Callable:
        """``torch.compile`` with static shapes (one graph per distinct batch shape: at most two per run with a
        partial last batch, none with ``train.drop_last``) in the run's compile mode; ``fn`` itself when off."""
        if not self.compile:
            return fn
        return torch.compile(fn, mode=self.compile_mode, dynamic=False)
