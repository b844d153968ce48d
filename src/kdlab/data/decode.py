"""Decoding a view of an encoded image: the one step a GPU decoder could replace.

A streamed sample goes through three stages (in a DataLoader worker):

1. **read** the encoded bytes (an image file through :mod:`kdlab.fileio`, or a member of a WebDataset shard);
2. **plan** the view from the image's header size alone (:mod:`kdlab.data.images`): a :class:`Crop` — source box,
   output size, mirror — drawn from the sample's ``(seed, epoch, index)`` generator;
3. **render** the crop (:meth:`SourceImage.render`): decode, cut out the box, resize to the output, mirror; uint8
   H×W×C out.

Rendering decodes less when it can: a JPEG is decoded at the largest DCT reduction (1/2, 1/4, 1/8: libjpeg-turbo's
scaled IDCT, Pillow's draft mode) that still leaves the crop box at least as many pixels as the output in each
dimension (:func:`dct_reduction`); the resize then starts from those pixels. Both decoders below give bit-identical
pixels at every reduction (both are libjpeg-turbo with the accurate integer IDCT and fancy upsampling), so the
decoder is a speed choice only. The resize is bilinear with antialiasing (Pillow's filter, computed by torch's uint8
kernel).

Decoders (``data.decoder``): ``pillow`` (every format Pillow reads), ``simplejpeg`` (libjpeg-turbo's TurboJPEG API
straight into a NumPy array for YCbCr/greyscale JPEGs, Pillow for anything else; ``pip install simplejpeg``) and
``auto`` (simplejpeg when installed). A GPU decoder (nvJPEG through DALI or ``torchvision.io.decode_jpeg`` on CUDA)
would take the place of step 3 for a whole batch on the device: workers would return the encoded bytes with their
:class:`Crop` plans (steps 1–2 stay where they are, so the views — a function of ``(seed, epoch, index)`` and the
header size — would not change), and the device would decode, crop and resize the batch. It registers in
:data:`IMAGE_DECODERS` like the CPU decoders.

Bounds: an image whose header declares more than ``max_pixels`` pixels (``data.max_image_pixels``) is refused before
any pixel is decoded, and so is a resize whose output would exceed it — a 107-byte 1×60000 PNG cannot make a
gigabyte. Errors are :class:`BadImage` (one line naming the reason); the caller adds the file or member name.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from kdlab.config import DataConfig
from kdlab.errors import ConfigError
from kdlab.registry import Registry

DEFAULT_MAX_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default
"""Default ``data.max_image_pixels``: 2^28 = 268 million pixels (e.g. 20,000 × 13,400), above any camera's photos."""
REDUCTIONS = (8, 4, 2)
_JPEG_MAGIC = b"\xff\xd8\xff"


class BadImage(Exception):
    """An image that cannot be rendered (corrupt, truncated, too large); ``str()`` is the reason."""


@dataclass(frozen=True)
class Crop:
    """A planned view: the source ``box`` ``(left, top, width, height)`` in the image's full-size pixels (may be
    fractional), resized to ``out`` ``(width, height)``, mirrored left-right when ``flip``."""

    box: tuple[float, float, float, float]
    out: tuple[int, int]
    flip: bool = False


@dataclass(frozen=True)
class DecodeOptions:
    """How a source renders: the decoder name, whether to decode at reduced scale, the pixel bound."""

    decoder: str = "auto"
    reduce: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS


def dct_reduction(crop: Crop) -> int:
    """The largest JPEG DCT reduction ``s`` in (8, 4, 2, 1) that leaves the crop box at least as many pixels as the
    output in each dimension: ``box_width / s ≥ out_width`` and ``box_height / s ≥ out_height``."""
    _, _, bw, bh = crop.box
    ow, oh = crop.out
    for s in REDUCTIONS:
        if bw / s >= ow and bh / s >= oh:
            return s
    return 1


class Encoded(Protocol):
    """An opened (header-parsed, not yet decoded) image."""

    width: int
    height: int

    def decode(self, reduce: int) -> tuple[np.ndarray, int]:
        """RGB pixels as a uint8 H×W×3 array at 1/``reduce`` scale (``reduce`` in 1, 2, 4, 8) or at the smaller
        reduction the format allows; returns the array and the reduction applied."""
        ...


class Decoder(Protocol):
    def open(self, data: bytes) -> Encoded:
        """Parse the header of ``data``; raises :class:`BadImage`."""
        ...


# ---------------------------------------------------------------------------------------------------------------------
# Pillow


def pil_image() -> Any:
    """The ``PIL.Image`` module, or a one-line error naming the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("image data needs Pillow: pip install 'kdlab[images]'") from None
    return Image


class _PillowEncoded:
    def __init__(self, data: bytes, max_pixels: int) -> None:
        image_mod = pil_image()
        _allow_pillow(image_mod, max_pixels)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
            self.img = image_mod.open(io.BytesIO(data))
        self.width, self.height = self.img.size

    def decode(self, reduce: int) -> tuple[np.ndarray, int]:
        img = self.img
        if reduce > 1 and img.format == "JPEG":
            img.draft("RGB", (self.width // reduce, self.height // reduce))  # Pillow picks scale = W // w
        applied = max(1, round(self.width / img.size[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF/ICC warnings
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
        return np.asarray(img), applied


class PillowDecoder:
    """Every format Pillow reads; JPEGs at reduced scale through Pillow's draft mode."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels

    def open(self, data: bytes) -> Encoded:
        return _PillowEncoded(data, self.max_pixels)


def _allow_pillow(image_mod: Any, max_pixels: int) -> None:
    """Let Pillow open images up to kdlab's own bound (Pillow refuses above 2 × ``MAX_IMAGE_PIXELS``, ~179 M)."""
    limit = image_mod.MAX_IMAGE_PIXELS
    if limit is not None and 2 * limit < max_pixels:
        image_mod.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


# ---------------------------------------------------------------------------------------------------------------------
# simplejpeg (libjpeg-turbo's TurboJPEG API)


class _SimpleJpegEncoded:
    def __init__(self, data: bytes, header: tuple) -> None:
        self.data = data
        self.height, self.width = int(header[0]), int(header[1])

    def decode(self, reduce: int) -> tuple[np.ndarray, int]:
        import simplejpeg

        if reduce > 1:  # the smallest TurboJPEG scaling factor giving at least ceil(W / s) columns is exactly 1/s
            arr = simplejpeg.decode_jpeg(self.data, "RGB", min_width=-(-self.width // reduce),
                                         min_height=-(-self.height // reduce))  # fmt: skip
        else:
            arr = simplejpeg.decode_jpeg(self.data, "RGB")
        return arr, max(1, round(self.width / arr.shape[1]))


class SimpleJpegDecoder:
    """YCbCr and greyscale JPEGs through simplejpeg; other formats and colour spaces (CMYK) through Pillow."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        try:
            import simplejpeg  # noqa: F401
        except ImportError:
            raise ConfigError("data.decoder=simplejpeg needs simplejpeg: pip install simplejpeg") from None
        self.pillow = PillowDecoder(max_pixels)

    def open(self, data: bytes) -> Encoded:
        if data[:3] == _JPEG_MAGIC:
            import simplejpeg

            try:
                header = simplejpeg.decode_jpeg_header(data)
            except ValueError:
                header = None  # let Pillow name what is wrong
            if header is not None and header[2] in ("YCbCr", "Gray"):
                return _SimpleJpegEncoded(data, header)
        return self.pillow.open(data)


def _simplejpeg_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("simplejpeg") is not None


IMAGE_DECODERS: Registry[type] = Registry("image decoder")
IMAGE_DECODERS.add("pillow", PillowDecoder)
IMAGE_DECODERS.add("simplejpeg", SimpleJpegDecoder)


def build_decoder(name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoder:
    """The decoder ``name`` (``auto``: simplejpeg when installed, else Pillow)."""
    if name == "auto":
        name = "simplejpeg" if _simplejpeg_installed() else "pillow"
    return IMAGE_DECODERS.get(name)(max_pixels)


# ---------------------------------------------------------------------------------------------------------------------
# rendering


def _bounded(out: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """``out`` if a resize to it stays within ``max_pixels`` (``data.max_image_pixels``), else :class:`BadImage`."""
    if out[0] * out[1] > max_pixels:
        raise BadImage(f"a resize to {out[0]}×{out[1]} would exceed data.max_image_pixels={max_pixels}")
    return out


def resize(region: np.ndarray, out: tuple[int, int], max_pixels: int) -> torch.Tensor:
    """A uint8 H×W×C region resized to ``out`` ``(width, height)``: bilinear with antialiasing (Pillow's filter);
    returned H×W×C (dense). The output is bounded by ``max_pixels``."""
    ow, oh = _bounded(out, max_pixels)
    if not (region.flags.c_contiguous and region.flags.writeable):
        region = np.array(region, order="C")  # the crop (and mirror) copied once, writable for torch
    x = torch.from_numpy(region)
    if x.shape[0] == oh and x.shape[1] == ow:
        return x
    nchw = x.unsqueeze(0).permute(0, 3, 1, 2)  # channels-last memory: torch's vectorised uint8 kernel
    try:
        y = torch.nn.functional.interpolate(nchw, size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)
    except RuntimeError:  # a torch without the uint8 kernel
        y = torch.nn.functional.interpolate(nchw.float(), size=(oh, ow), mode="bilinear", antialias=True,
                                            align_corners=False).round_().clamp_(0, 255).to(torch.uint8)  # fmt: skip
    return y[0].permute(1, 2, 0)


def _resize_box(arr: np.ndarray, box: tuple[float, float, float, float], crop: Crop, max_pixels: int) -> torch.Tensor:
    """``box`` ``(left, top, width, height)`` of a uint8 H×W×3 array — fractional — resized to ``crop.out``
    (Pillow's antialiased bilinear, which centres its filter on the box's own pixel grid), mirrored if asked."""
    ow, oh = _bounded(crop.out, max_pixels)
    h, w = arr.shape[:2]
    left, top, bw, bh = box
    x0, y0 = min(max(left, 0.0), w - 1e-3), min(max(top, 0.0), h - 1e-3)
    x1, y1 = min(max(left + bw, x0 + 1e-3), float(w)), min(max(top + bh, y0 + 1e-3), float(h))
    image_mod = pil_image()
    out = np.asarray(image_mod.fromarray(arr).resize((ow, oh), image_mod.Resampling.BILINEAR, box=(x0, y0, x1, y1)))
    return torch.from_numpy(np.array(out[:, ::-1] if crop.flip else out, order="C"))


class SourceImage:
    """An encoded image opened for rendering views (``width`` / ``height``: its full size from the header)."""

    def __init__(self, data: bytes, decoder: Decoder, options: DecodeOptions) -> None:
        try:
            self.encoded = decoder.open(data)
        except BadImage:
            raise
        except Exception as err:  # Pillow: UnidentifiedImageError, SyntaxError, struct.error, ...
            raise BadImage(describe_error(err)) from None
        self.width, self.height = self.encoded.width, self.encoded.height
        self.options = options
        pixels = self.width * self.height
        if self.width < 1 or self.height < 1:
            raise BadImage(f"image has no pixels ({self.width}×{self.height})")
        if pixels > options.max_pixels:
            raise BadImage(f"image is {self.width}×{self.height} = {pixels:,} pixels, over data.max_image_pixels="
                           f"{options.max_pixels:,}")  # fmt: skip

    def render(self, crop: Crop) -> torch.Tensor:
        """Decode (at the largest allowed reduction), cut out ``crop.box``, resize to ``crop.out``, mirror: uint8
        H×W×3."""
        reduce = dct_reduction(crop) if self.options.reduce else 1
        try:
            arr, applied = self.encoded.decode(reduce)
        except Exception as err:
            raise BadImage(describe_error(err)) from None
        h, w = arr.shape[:2]
        left, top, bw, bh = (v / applied for v in crop.box)
        if applied > 1:  # the box is fractional in reduced pixels: resampled exactly where it lies (Pillow's
            return _resize_box(arr, (left, top, bw, bh), crop, self.options.max_pixels)  # box resize), small input
        # the box snapped to whole decoded pixels: its size rounded (the scale stays within half a pixel of the
        # plan), its corner to the nearest pixel (torchvision's centre crop rounds its offsets the same way)
        cw, ch = min(max(int(bw + 0.5), 1), w), min(max(int(bh + 0.5), 1), h)
        x0, y0 = min(max(int(left + 0.5), 0), w - cw), min(max(int(top + 0.5), 0), h - ch)
        region = arr[y0 : y0 + ch, x0 : x0 + cw]
        if crop.flip:
            region = region[:, ::-1]
        return resize(region, crop.out, self.options.max_pixels)


def describe_error(err: BaseException) -> str:
    """``"TypeName: first line of the message"`` — a library's exception as one line of a kdlab message."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def full_crop(width: int, height: int, out: tuple[int, int] | None = None) -> Crop:
    """The whole image, at its own size or resized to ``out``."""
    return Crop((0.0, 0.0, float(width), float(height)), out or (width, height))
