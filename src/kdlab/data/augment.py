"""Input transforms that run as batched tensor operations on the training device.

:class:`ImageAugment` implements the standard CIFAR augmentation (random 32×32 crop of the image zero-padded by 4 pixels,
horizontal flip with probability 1/2) followed by per-channel normalisation. Crop and flip are one gather on the whole
batch — no PIL, no per-sample Python loop. The crop offsets and flips of an epoch are a pure function of
``(seed, epoch, sample index)``, so a run is reproducible and a teacher-output cache can replay them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdlab.data.strong import STRONG_VIEWS, StrongPolicy, counter_normal, counter_uniform
from kdlab.seeding import generator

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class AugmentParams:
    """Per-sample augmentation of one epoch: crop offsets ``dy, dx`` in [0, 2·pad] and ``flip`` flags."""

    dy: torch.Tensor
    dx: torch.Tensor
    flip: torch.Tensor


@dataclass
class ImageAugment:
    """Random crop with zero padding + horizontal flip, then normalisation, on uint8 N×C×H×W batches."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_samples: int
    pad: int = 4
    flip: bool = True
    enabled: bool = True
    strong: StrongPolicy = "randaugment"
    _cache: dict = field(default_factory=dict, repr=False)
    _consts: dict = field(default_factory=dict, repr=False)

    def epoch_params(self, seed: int, epoch: int, n: int, device: torch.device | str = "cpu") -> AugmentParams:
        """Augmentation parameters of every sample for one epoch (drawn once per epoch, indexed per batch)."""
        key = (seed, epoch, n, str(device))
        if key not in self._cache:
            g = generator(seed, "augment", epoch)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            fl = torch.randint(0, 2, (n,), generator=g).bool() if self.flip else torch.zeros(n, dtype=torch.bool)
            self._cache.clear()  # keep only the current epoch
            self._cache[key] = AugmentParams(dy.to(device), dx.to(device), fl.to(device))
        return self._cache[key]

    def crop_flip(self, x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply per-sample crop offsets and flips to a uint8 batch; returns a channels-last uint8 batch.

        One row gather: the zero-padded batch as (N·(H+2p)·(W+2p))×C pixels, and the flat source pixel of every
        output pixel (sample offset + row · padded width + column, the column mirrored for flipped samples)."""
        b, c, h, w = x.shape
        p = self.pad
        hp, wp = h + 2 * p, w + 2 * p
        pixels = torch.nn.functional.pad(x, (p, p, p, p)).permute(0, 2, 3, 1).reshape(b * hp * wp, c)
        dev = x.device
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        rows = (params.dy[:, None] + ar_h[None, :]) * wp + (torch.arange(b, device=dev) * (hp * wp))[:, None]  # B×H
        cols = torch.where(params.flip[:, None], w - 1 - ar_w[None, :], ar_w[None, :]) + params.dx[:, None]  # B×W
        src = (rows[:, :, None] + cols[:, None, :]).reshape(-1)
        return pixels.index_select(0, src).view(b, h, w, c).permute(0, 3, 1, 2)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 → float, scaled to [0, 1] and standardised per channel: ``x · 1/(255·std) − mean/std`` in place on
        the float copy (memory format kept)."""
        key = ("norm", str(x.device))
        if key not in self._consts:  # built once per device, not copied to the device every batch
            mean = torch.tensor(self.mean, dtype=torch.float64).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float64).view(1, -1, 1, 1)
            self._consts[key] = ((1 / (255 * std)).float().to(x.device), (-mean / std).float().to(x.device))
        scale, shift = self._consts[key]
        return x.to(torch.float32, copy=True).mul_(scale).add_(shift)  # a copy even if x is float already

    def train_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        if self.enabled:
            params = self.epoch_params(seed, epoch, self.num_samples, x.device)
            sel = AugmentParams(params.dy[index], params.dx[index], params.flip[index])
            x = self.crop_flip(x, sel)
        return self.normalize(x)

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)

    def strong_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """A second, strong view (two-view methods such as MLKD), then normalisation: ``strong`` names the policy
        (:mod:`kdlab.data.strong`; ``randaugment`` is the MLKD release's). Its randomness is drawn per batch on
        the batch's device from ``(seed, epoch, sample index)``: O(batch) work and memory."""
        view = STRONG_VIEWS[self.strong](x, index, seed, epoch, self.pad)
        return self.normalize(view.to(torch.uint8))


@dataclass
class VectorTransform:
    """Transform for 1-D signals stored ready to use (standardised MNIST-1D vectors).

    With ``shift`` > 0, training batches are translated by a per-sample offset in [−shift, shift] with zero fill
    (zero is the standardised mean); offsets are a pure function of ``(seed, epoch, sample index)``.
    """

    shift: int = 0
    num_samples: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def epoch_shifts(self, seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        key = (seed, epoch, str(device))
        if key not in self._cache:
            g = generator(seed, "shift", epoch)
            self._cache.clear()
            self._cache[key] = torch.randint(-self.shift, self.shift + 1, (self.num_samples,), generator=g).to(device)
        return self._cache[key]

    def train_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        if self.shift <= 0:
            return x
        s = self.epoch_shifts(seed, epoch, x.device)[index]
        length = x.shape[-1]
        src = torch.arange(length, device=x.device)[None, :] - s[:, None]  # out[i] = x[i - s]
        valid = (src >= 0) & (src < length)
        out = torch.gather(x.reshape(len(x), length), 1, src.clamp(0, length - 1)) * valid
        return out.reshape(x.shape)

    def eval_batch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def strong_batch(self, x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """A strong view for two-view methods: a translation of up to ±max(2·shift, 4) samples plus Gaussian noise
        (σ = 0.1), drawn per batch on the batch's device from ``(seed, epoch, sample index)`` (O(batch))."""
        shift = max(2 * self.shift, 4)
        length = x.shape[-1]
        s = torch.floor(counter_uniform(seed, epoch, 3, index, 1)[:, 0] * (2 * shift + 1)).long() - shift
        src = torch.arange(length, device=x.device)[None, :] - s[:, None]  # out[i] = x[i - s]
        valid = (src >= 0) & (src < length)
        out = torch.gather(x.reshape(len(x), length), 1, src.clamp(0, length - 1)) * valid
        noise = counter_normal(seed, epoch, 4, index, length)
        return (out + 0.1 * noise).reshape(x.shape)
