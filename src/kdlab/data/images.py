"""Views of streamed images: what each training, strong and evaluation view is cut from (run in DataLoader workers).

Every random choice of a view — crop box, flip, colour jitter — comes from a generator keyed by
``(augment seed, view kind, epoch, sample index)`` (:func:`view_rng`) and the image's header size, so a view is the
same in any worker, in any process, after ``--resume``, from an image folder or a WebDataset shard, and a teacher
cache can replay it. A transform only *plans* crops (:class:`~kdlab.data.decode.Crop`); the decode, cut and resize
are one step, :meth:`kdlab.data.decode.SourceImage.render`, which decodes JPEGs at reduced scale where the crop is
shrunk anyway. Images leave here as uint8 H×W×C (handed on as a C×H×W view, channels-last in memory); normalisation
runs batched on the training device.

Transforms (``data.transform``):

* ``imagenet`` — training: RandomResizedCrop to ``size`` (area scale 0.08–1, aspect ratio 3/4–4/3, torchvision's
  ten-trial algorithm with a centre-crop fallback) + horizontal flip (p = 1/2); evaluation: resize the shorter side
  to ``round(size · 256 / 224)`` + centre crop ``size`` (256 / 224 at the default 224), rendered as one resize of the
  centre box (no full-size intermediate); ImageNet mean / std.
* ``cifar`` — images resized to ``size`` (default 32) when they differ; training: random crop of the zero-padded
  (4 px) image + horizontal flip; evaluation: the image itself; CIFAR-100 mean / std. Matches the resident CIFAR path.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from kdlab.data.augment import CIFAR100_MEAN, CIFAR100_STD
from kdlab.data.decode import (
    BadImage, Crop, DecodeOptions, Decoder, SourceImage, build_decoder, full_crop, pil_image,
)  # fmt: skip
from kdlab.data.stream import BadSample, View
from kdlab.registry import Registry
from kdlab.seeding import derive_seed

if TYPE_CHECKING:
    from kdlab.config import DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
JITTER = (0.6, 1.4)  # brightness / contrast / saturation factors of the streamed strong view


def view_rng(seed: int, kind: str, epoch: int, index: int) -> random.Random:
    """The generator of one sample's augmentation in one epoch: a pure function of its arguments."""
    return random.Random(derive_seed(seed, "view", kind, epoch, index))


def random_resized_crop_box(
    width: int, height: int, rng: random.Random, scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:  # fmt: skip
    """``(left, top, crop_width, crop_height)`` of a RandomResizedCrop (torchvision's sampling, drawn from ``rng``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            return rng.randint(0, width - cw), rng.randint(0, height - ch), cw, ch
    in_ratio = width / height  # fallback: the whole image, centre-cropped to the nearest allowed aspect ratio
    if in_ratio < ratio[0]:
        cw, ch = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(height * ratio[1]), height
    else:
        cw, ch = width, height
    return (width - cw) // 2, (height - ch) // 2, max(cw, 1), max(ch, 1)


class ImageTransform(Protocol):
    """What a streamed image source needs: training, strong and evaluation views (uint8 H×W×C) of an image."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train(self, src: SourceImage, rng: random.Random) -> torch.Tensor: ...

    def strong(self, src: SourceImage, rng: random.Random) -> torch.Tensor: ...

    def eval(self, src: SourceImage) -> torch.Tensor: ...


def _jitter(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Brightness, contrast and saturation (Pillow's ImageEnhance) of a uint8 H×W×3 tensor."""
    from PIL import ImageEnhance

    img = pil_image().fromarray(x.numpy())
    for enhance, f in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
        img = enhance(img).enhance(f)
    return torch.from_numpy(np.array(img, dtype=np.uint8))


@dataclass(frozen=True)
class ImagenetTransform:
    """RandomResizedCrop + flip for training; resize + centre crop for evaluation (see the module docstring)."""

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def train_crop(self, width: int, height: int, rng: random.Random) -> Crop:
        box = random_resized_crop_box(width, height, rng)
        return Crop(box, (self.size, self.size), rng.random() < 0.5)

    def eval_crop(self, width: int, height: int) -> Crop:
        """The centre ``size`` square of the image resized to shorter side ``round(size · 256 / 224)``, as a box of
        the full-size image."""
        short = round(self.size * 256 / 224)
        nw, nh = (short, int(short * height / width)) if width <= height else (int(short * width / height), short)
        nw, nh = max(nw, self.size), max(nh, self.size)
        left, top = int(round((nw - self.size) / 2)), int(round((nh - self.size) / 2))
        sx, sy = width / nw, height / nh
        return Crop((left * sx, top * sy, self.size * sx, self.size * sy), (self.size, self.size))

    def train(self, src: SourceImage, rng: random.Random) -> torch.Tensor:
        return src.render(self.train_crop(src.width, src.height, rng))

    def strong(self, src: SourceImage, rng: random.Random) -> torch.Tensor:
        """An independent RandomResizedCrop + flip view with per-image brightness / contrast / saturation jitter
        (factors in [0.6, 1.4]) — the streamed counterpart of the resident strong view."""
        box = random_resized_crop_box(src.width, src.height, rng)
        factors = [rng.uniform(*JITTER) for _ in range(3)]
        crop = Crop(box, (self.size, self.size), rng.random() < 0.5)  # the jitter is pointwise: flip order is free
        return _jitter(src.render(crop), factors)

    def eval(self, src: SourceImage) -> torch.Tensor:
        return src.render(self.eval_crop(src.width, src.height))


@dataclass(frozen=True)
class CifarTransform:
    """CIFAR-style augmentation of (small) images: zero-pad by ``pad``, random ``size`` crop, flip."""

    size: int = 32
    mean: tuple[float, ...] = CIFAR100_MEAN
    std: tuple[float, ...] = CIFAR100_STD
    pad: int = 4

    def _sized(self, src: SourceImage) -> torch.Tensor:
        return src.render(full_crop(src.width, src.height, (self.size, self.size)))

    def _pad_crop_flip(self, x: torch.Tensor, rng: random.Random) -> torch.Tensor:
        p, s = self.pad, self.size
        dy, dx, flip = rng.randint(0, 2 * p), rng.randint(0, 2 * p), rng.random() < 0.5
        out = torch.nn.functional.pad(x, (0, 0, p, p, p, p))[dy : dy + s, dx : dx + s]  # H×W×C, zero padded
        return (out.flip(1) if flip else out).contiguous()

    def train(self, src: SourceImage, rng: random.Random) -> torch.Tensor:
        return self._pad_crop_flip(self._sized(src), rng)

    def strong(self, src: SourceImage, rng: random.Random) -> torch.Tensor:
        factors = [rng.uniform(*JITTER) for _ in range(3)]
        return self._pad_crop_flip(_jitter(self._sized(src), factors), rng)

    def eval(self, src: SourceImage) -> torch.Tensor:
        return self._sized(src)


@dataclass
class ImageViews:
    """Encoded image bytes → the uint8 view a request asks for (shared by image folders and WebDataset shards)."""

    transform: ImageTransform
    decoder: Decoder
    options: DecodeOptions
    augment: bool = True

    def load(self, data: bytes, index: int, view: View, name: str) -> torch.Tensor:
        """Sample ``index``'s view as a uint8 C×H×W tensor (channels-last memory); :class:`BadSample` names
        ``name`` when the image cannot be rendered."""
        try:
            src = SourceImage(data, self.decoder, self.options)
            if view is None or not self.augment:
                x = self.transform.eval(src)
            else:
                kind, seed, epoch = view
                rng = view_rng(seed, kind, epoch, index)
                x = self.transform.strong(src, rng) if kind == "strong" else self.transform.train(src, rng)
        except BadImage as err:
            raise BadSample(f"unreadable image {name} ({err})") from None
        return x.permute(2, 0, 1)


def build_image_views(cfg: DataConfig, transform: ImageTransform, augment: bool = True) -> ImageViews:
    """The decoder and decode options of ``cfg`` (``data.decoder``, ``data.reduced_decode``,
    ``data.max_image_pixels``) around ``transform``."""
    options = DecodeOptions(cfg.decoder, cfg.reduced_decode, cfg.max_image_pixels)
    return ImageViews(transform, build_decoder(cfg.decoder, cfg.max_image_pixels), options, augment)


IMAGE_TRANSFORMS: Registry[type] = Registry("image transform")
IMAGE_TRANSFORMS.add("imagenet", ImagenetTransform)
IMAGE_TRANSFORMS.add("cifar", CifarTransform)


def build_image_transform(
    name: str, size: int | None = None, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> ImageTransform:
    """The transform ``name`` at ``size`` (default: its own) with optional mean / std overrides."""
    cls = IMAGE_TRANSFORMS.get(name)
    kwargs: dict[str, Any] = {}
    if size is not None:
        kwargs["size"] = size
    if mean is not None:
        kwargs["mean"] = tuple(mean)
    if std is not None:
        kwargs["std"] = tuple(std)
    return cls(**kwargs)
