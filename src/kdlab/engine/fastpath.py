"""The fast path of a run on its device: memory format, autocast, gradient scaling, cudnn autotuning, compile.

Everything here only changes how fast the same computation runs (and, with autocast, its precision); it never
changes what is computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from kdlab.config import TrainConfig


class FastPath:
    """Per-run speed settings derived from ``cfg.train`` and the device."""

    def __init__(self, cfg: TrainConfig, device: torch.device, example: torch.Tensor) -> None:
        self.device = device
        # NHWC for image models (default on CUDA)
        self.channels_last = (device.type == "cuda") if cfg.channels_last is None else cfg.channels_last
        self.channels_last = bool(self.channels_last and example.dim() == 4)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
        self.compile = cfg.compile

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

    def maybe_compile(self, fn: Callable) -> Callable:
        return torch.compile(fn) if self.compile else fn
