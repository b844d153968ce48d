"""Per-image decoding and augmentation of streamed image data (Pillow, run inside DataLoader worker processes).

Every random choice of a training view — crop box, flip — comes from a generator keyed by
``(augment seed, view kind, epoch, sample index)`` (:func:`view_rng`), so a view is the same in any worker, in any
process and after ``--resume``, and a teacher cache can replay it. Images leave here as uint8 C×H×W tensors;
normalisation runs batched on the training device.

Transforms (``data.transform``):

* ``imagenet`` — training: RandomResizedCrop to ``size`` (area scale 0.08–1, aspect ratio 3/4–4/3, torchvision's
  ten-trial algorithm with a centre-crop fallback) + horizontal flip (p = 1/2); evaluation: resize the shorter side
  to ``round(size · 256 / 224)`` + centre crop ``size`` (256 / 224 at the default 224); ImageNet mean / std.
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
from kdlab.errors import ConfigError
from kdlab.registry import Registry
from kdlab.seeding import derive_seed

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pil_image() -> Any:
    """The ``PIL.Image`` module, or a one-line error naming the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image folders need Pillow: pip install 'kdlab[images]'") from None
    return Image


def view_rng(seed: int, kind: str, epoch: int, index: int) -> random.Random:
    """The generator of one sample's augmentation in one epoch: a pure function of its arguments."""
    return random.Random(derive_seed(seed, "view", kind, epoch, index))


def decode(path: str) -> Image:
    """Read an image file fully into RGB (raises on a corrupt or truncated file)."""
    image_mod = pil_image()
    with open(path, "rb") as f:
        img = image_mod.open(f)
        img.load()
    return img.convert("RGB")


def to_tensor(img: Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 3×H×W tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


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
    return (width - cw) // 2, (height - ch) // 2, cw, ch


class ImageTransform(Protocol):
    """What a streamed image source needs: training, strong and evaluation views of a decoded image."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def train(self, img: Image, rng: random.Random) -> torch.Tensor: ...

    def strong(self, img: Image, rng: random.Random) -> torch.Tensor: ...

    def eval(self, img: Image) -> torch.Tensor: ...


def _flip(img: Image, rng: random.Random) -> Image:
    return img.transpose(pil_image().Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


@dataclass(frozen=True)
class ImagenetTransform:
    """RandomResizedCrop + flip for training; resize + centre crop for evaluation (see the module docstring)."""

    size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def train(self, img: Image, rng: random.Random) -> torch.Tensor:
        left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng)
        out = img.resize((self.size, self.size), pil_image().Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        return to_tensor(_flip(out, rng))

    def strong(self, img: Image, rng: random.Random) -> torch.Tensor:
        """An independent RandomResizedCrop + flip view with per-image brightness / contrast / saturation jitter
        (factors in [0.6, 1.4]) — the streamed counterpart of the resident strong view."""
        from PIL import ImageEnhance

        left, top, cw, ch = random_resized_crop_box(img.width, img.height, rng)
        out = img.resize((self.size, self.size), pil_image().Resampling.BILINEAR, box=(left, top, left + cw, top + ch))
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            out = enhance(out).enhance(rng.uniform(0.6, 1.4))
        return to_tensor(_flip(out, rng))

    def eval(self, img: Image) -> torch.Tensor:
        short = round(self.size * 256 / 224)
        w, h = img.size
        nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize((nw, nh), pil_image().Resampling.BILINEAR)
        left, top = int(round((nw - self.size) / 2)), int(round((nh - self.size) / 2))
        return to_tensor(img.crop((left, top, left + self.size, top + self.size)))


@dataclass(frozen=True)
class CifarTransform:
    """CIFAR-style augmentation of (small) images: zero-pad by ``pad``, random ``size`` crop, flip."""

    size: int = 32
    mean: tuple[float, ...] = CIFAR100_MEAN
    std: tuple[float, ...] = CIFAR100_STD
    pad: int = 4

    def _sized(self, img: Image) -> Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), pil_image().Resampling.BILINEAR)

    def train(self, img: Image, rng: random.Random) -> torch.Tensor:
        x = to_tensor(self._sized(img))
        p, s = self.pad, self.size
        dy, dx, flip = rng.randint(0, 2 * p), rng.randint(0, 2 * p), rng.random() < 0.5
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        out = padded[:, dy : dy + s, dx : dx + s]
        return out.flip(-1) if flip else out

    def strong(self, img: Image, rng: random.Random) -> torch.Tensor:
        from PIL import ImageEnhance

        img = self._sized(img)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.6, 1.4))
        return self.train(img, rng)

    def eval(self, img: Image) -> torch.Tensor:
        return to_tensor(self._sized(img))


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
