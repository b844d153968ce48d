"""The decode step of streamed images: reduced-scale JPEG decoding, decoders, resize, pixel bounds."""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")


def _jpeg(a: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def _source(data: bytes, **options):
    from kdlab.data.decode import DecodeOptions, SourceImage, build_decoder

    opts = DecodeOptions(**options)
    return SourceImage(data, build_decoder(opts.decoder, opts.max_pixels), opts)


@pytest.fixture(scope="module")
def photo() -> bytes:
    """A textured photo-like 800×600 JPEG (the bench's generator)."""
    from kdlab.benchdata import photo_like

    return _jpeg(photo_like(np.random.default_rng(3), 800, 600))


@pytest.mark.parametrize("box, out, want", [
    ((0, 0, 800, 600), (64, 64), 8), ((0, 0, 511, 600), (64, 64), 4), ((0, 0, 447, 447), (224, 224), 1),
    ((10, 10, 448, 460), (224, 224), 2), ((0, 0, 1792, 900), (224, 224), 4), ((0, 0, 300, 2000), (32, 256), 4),
])  # fmt: skip
def test_the_largest_reduction_that_keeps_the_crop_at_least_the_output_size(box, out, want):
    from kdlab.data.decode import Crop, dct_reduction

    assert dct_reduction(Crop(box, out)) == want


def test_reduced_decode_matches_full_decode_in_batch_statistics(photo):
    """Random-resized crops of a real-looking JPEG rendered from a reduced decode and from the full one: the same
    per-channel mean / std and nearly the same pixels (a misplaced box or a wrong scale would not be)."""
    from kdlab.data.images import ImagenetTransform

    from kdlab.data.decode import Crop, dct_reduction

    t = ImagenetTransform(size=64)
    fast, full = _source(photo), _source(photo, reduce=False)
    reduced = 0
    a, b, shifted = [], [], []
    for i in range(48):
        crop = t.train_crop(fast.width, fast.height, random.Random(i))
        reduced += dct_reduction(crop) > 1
        a.append(fast.render(crop).float())
        b.append(full.render(crop).float())
        left, top, w, h = crop.box
        shifted.append(full.render(Crop((min(left + 4, 800 - w), top, w, h), crop.out, crop.flip)).float())
    xa, xb, xs = torch.stack(a), torch.stack(b), torch.stack(shifted)
    assert reduced >= 24  # most crops of an 800×600 image are decoded at 1/2 or less for a 64-px output
    assert torch.allclose(xa.mean((0, 1, 2)), xb.mean((0, 1, 2)), atol=0.5)  # per-channel batch statistics
    assert torch.allclose(xa.std((0, 1, 2)), xb.std((0, 1, 2)), atol=1.0)
    # per pixel: the same content filtered a little differently (DCT scaling is a block average), far closer than
    # the same crop moved by 4 source pixels (a box misplaced by half a reduced pixel would be about as far)
    assert (xa - xb).abs().mean() < 0.4 * (xs - xb).abs().mean()
    assert (t.eval(fast).float() - t.eval(full).float()).abs().mean() < 3


def test_pillow_and_simplejpeg_decode_the_same_pixels_at_every_reduction(photo):
    from kdlab.data.decode import PillowDecoder, SimpleJpegDecoder

    grey = _jpeg(np.asarray(PIL.open(io.BytesIO(photo)).convert("L")))
    for data in (photo, grey):
        for s in (1, 2, 4, 8):
            a, sa = PillowDecoder().open(data).decode(s)
            b, sb = SimpleJpegDecoder().open(data).decode(s)
            assert sa == sb == s and a.shape == b.shape and a.shape[2] == 3 and np.array_equal(a, b)
    png = _png(np.zeros((5, 7, 3), np.uint8))  # not a JPEG: Pillow, full size
    arr, s = SimpleJpegDecoder().open(png).decode(4)
    assert s == 1 and arr.shape == (5, 7, 3)


def test_resize_is_pillows_antialiased_bilinear():
    from kdlab.data.decode import resize

    rng = np.random.default_rng(0)
    a = (rng.integers(0, 50, (90, 120, 3)) + np.linspace(0, 200, 120)[None, :, None]).astype(np.uint8)
    for size in ((40, 30), (160, 100)):
        ref = np.asarray(PIL.fromarray(a).resize(size, PIL.Resampling.BILINEAR)).astype(int)
        got = resize(a, size, 1 << 30).numpy().astype(int)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 2


def test_pixel_bounds_refuse_bombs_before_decoding_and_bound_every_resize():
    """A 1×60000 PNG (~100 bytes) renders its centre crop without a giant resize; a header over the bound is refused
    before any pixel is decoded; a resize whose output would exceed the bound is refused."""
    from kdlab.data.decode import BadImage, Crop
    from kdlab.data.images import ImagenetTransform

    strip = _png(np.zeros((60000, 1, 3), np.uint8))
    assert len(strip) < 1000
    t0 = time.perf_counter()
    out = ImagenetTransform().eval(_source(strip))
    assert tuple(out.shape) == (224, 224, 3) and time.perf_counter() - t0 < 5
    with pytest.raises(BadImage, match="over data.max_image_pixels=50,000"):
        _source(strip, max_pixels=50_000)
    with pytest.raises(BadImage, match="a resize to 300×300 would exceed"):
        _source(_png(np.zeros((4, 4, 3), np.uint8)), max_pixels=60_000).render(Crop((0, 0, 4, 4), (300, 300)))


def test_corrupt_and_truncated_images_are_bad_images(photo):
    from kdlab.data.decode import BadImage, Crop

    with pytest.raises(BadImage):
        _source(b"definitely not an image")
    src = _source(photo[: len(photo) // 2])  # the header parses; the pixels are cut short
    with pytest.raises(BadImage):
        src.render(Crop((0, 0, 800, 600), (32, 32)))
