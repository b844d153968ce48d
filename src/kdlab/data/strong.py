"""The strong view of two-view methods (MLKD), as batched tensor operations on the training device.

Randomness is counter-based: every draw is a hash (splitmix64) of ``(seed, epoch, stream, sample index, draw)``
computed on the batch's device, so a batch costs O(batch) memory and time, no generator state is kept, and the view
of a sample is the same whatever batch, rank or resume it comes in.

Two policies for images (uint8 N×C×H×W in, normalised float out):

* ``randaugment`` — the MLKD release's strong transform (``get_cifar100_train_transform_strong``: RandomCrop 32 pad 4,
  horizontal flip, FixMatch-style ``RandAugment(2, 10)``: two ops drawn uniformly with replacement from 14
  (AutoContrast, Brightness, Color, Contrast, Equalize, Identity, Posterize, Rotate, Sharpness, ShearX, ShearY,
  Solarize, TranslateX, TranslateY) with a magnitude uniform in each op's range, then Cutout of a square of side
  U(0, 0.5)·32 filled with (125, 123, 114)). The PIL operations are re-expressed on tensors (nearest-neighbour
  affine maps on pixel centres with black fill, PIL's enhance blends, equalize/autocontrast look-up tables,
  results rounded to 8 bits after each op).
* ``jitter_cutout`` — kdlab's earlier stand-in: crop + flip, brightness/contrast/saturation jitter in [0.6, 1.4],
  one 16×16 cutout.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.nn import functional as F

StrongPolicy = Literal["randaugment", "jitter_cutout"]

_M64 = (1 << 64) - 1


def _s64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _MUL1, _MUL2 = _s64(0x9E3779B97F4A7C15), _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (as uint64)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: torch.Tensor) -> torch.Tensor:
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MUL1
    x = (x ^ _shr(x, 27)) * _MUL2
    return x ^ _shr(x, 31)


def _key(*parts: int) -> int:
    k = 0
    for p in parts:  # python-side splitmix chain (exact 64-bit arithmetic)
        k = (k + (p & _M64) + 0x9E3779B97F4A7C15) & _M64
        k = ((k ^ (k >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        k = ((k ^ (k >> 27)) * 0x94D049BB133111EB) & _M64
        k ^= k >> 31
    return _s64(k)


def counter_uniform(seed: int, epoch: int, stream: int, index: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` float32 uniforms in [0, 1): a pure function of ``(seed, epoch, stream, index[b], j)``, computed on
    ``index``'s device."""
    draws = torch.arange(n, device=index.device, dtype=torch.long)
    x = _splitmix(index.long()[:, None] * _MUL2 + _key(seed, epoch, stream))
    x = _splitmix(x + draws[None, :] * _GOLDEN)
    return _shr(x, 40).float() * (1.0 / (1 << 24))


def counter_normal(seed: int, epoch: int, stream: int, index: torch.Tensor, n: int) -> torch.Tensor:
    """``(B, n)`` standard normals (Box-Muller on :func:`counter_uniform`)."""
    u = counter_uniform(seed, epoch, stream, index, 2 * n)
    r = torch.sqrt(-2.0 * torch.log1p(-u[:, :n]))  # 1 − u ∈ (0, 1]
    return r * torch.cos(2 * math.pi * u[:, n:])


# ---------------------------------------------------------------------------------------------------------------------
# geometric ops: one nearest-neighbour affine map per sample (output pixel centre → input), black fill


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``out[y, x] = in[floor(a(x+½) + b(y+½) + c), floor(d(x+½) + e(y+½) + f)]`` (PIL ``Image.transform`` AFFINE,
    NEAREST); ``m`` is B×6 ``(a, b, c, d, e, f)``; outside the image: 0."""
    b, c, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float32)[None, None, :] + 0.5
    m = m[:, :, None, None]
    xin = torch.floor(m[:, 0] * xs + m[:, 1] * ys + m[:, 2]).long()
    yin = torch.floor(m[:, 3] * xs + m[:, 4] * ys + m[:, 5]).long()
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    flat = (yin.clamp(0, h - 1) * w + xin.clamp(0, w - 1)).reshape(b, 1, h * w).expand(b, c, h * w)
    out = torch.gather(x.reshape(b, c, h * w), 2, flat).reshape(b, c, h, w)
    return out * inside[:, None]


def _geometry(op: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B×6 affine coefficients of Rotate (7), ShearX (9), ShearY (10), TranslateX (12), TranslateY (13); identity
    for the other ops."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    theta = -torch.deg2rad(v)  # PIL rotate(v): counter-clockwise, about the centre
    cos, sin = torch.cos(theta), torch.sin(theta)
    cx, cy = w / 2.0, h / 2.0
    rot = torch.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], 1)
    table = {
        7: rot,
        9: torch.stack([one, v, zero, zero, one, zero], 1),
        10: torch.stack([one, zero, zero, v, one, zero], 1),
        12: torch.stack([one, zero, v * w, zero, one, zero], 1),
        13: torch.stack([one, zero, zero, zero, one, v * h], 1),
    }
    m = torch.stack([one, zero, zero, zero, one, zero], 1)
    for k, coef in table.items():
        m = torch.where((op == k)[:, None], coef, m)
    return m


# ---------------------------------------------------------------------------------------------------------------------
# colour ops on 8-bit values held in float32 (each result rounded and clipped to [0, 255], as PIL's uint8 images)


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.round().clamp_(0, 255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert("L")``: (299 R + 587 G + 114 B) / 1000, rounded (single-channel images: unchanged)."""
    if x.shape[1] != 3:
        return x[:, :1]
    return _u8((x[:, 0:1] * 299 + x[:, 1:2] * 587 + x[:, 2:3] * 114) / 1000)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _u8(degenerate + factor[:, None, None, None] * (x - degenerate))


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageFilter.SMOOTH`` ([[1,1,1],[1,5,1],[1,1,1]]/13), border pixels unchanged."""
    c = x.shape[1]
    k = torch.ones(c, 1, 3, 3, device=x.device)
    k[:, :, 1, 1] = 5.0
    inner = _u8(F.conv2d(x, k / 13.0, groups=c))
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _lut(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel look-up table ``table`` (B×C×256) applied to 8-bit values."""
    b, c, h, w = x.shape
    return torch.gather(table, 2, x.long().reshape(b, c, h * w)).reshape(b, c, h, w).float()


def _hist(x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    hist = torch.zeros(b, c, 256, device=x.device)
    return hist.scatter_add_(2, x.long().reshape(b, c, -1), torch.ones_like(x).reshape(b, c, -1))


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): each channel's [min, max] stretched to [0, 255]."""
    lo = x.amin(dim=(2, 3), keepdim=True)[..., 0]
    hi = x.amax(dim=(2, 3), keepdim=True)[..., 0]
    scale = 255.0 / (hi - lo).clamp(min=1)
    levels = torch.arange(256, device=x.device, dtype=torch.float32)
    table = torch.floor(levels * scale - lo * scale).clamp(0, 255)
    table = torch.where(hi > lo, table, levels.expand_as(table))
    return _lut(x, table.long())


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize``: per channel, lut[i] = (step//2 + #pixels below i) // step with
    step = (#pixels − count of the top level) // 255; unchanged when step is 0."""
    hist = _hist(x)
    n = hist.sum(dim=2, keepdim=True)
    top = torch.gather(hist, 2, x.amax(dim=(2, 3)).long()[..., None])
    step = torch.div(n - top, 255, rounding_mode="floor")
    below = torch.cumsum(hist, dim=2) - hist
    table = torch.div(torch.div(step, 2, rounding_mode="floor") + below, step.clamp(min=1), rounding_mode="floor")
    levels = torch.arange(256, device=x.device, dtype=torch.float32).expand_as(table)
    table = torch.where(step > 0, table.clamp(0, 255), levels)
    return _lut(x, table.long())


# RandAugment(2, 10) of the release: (op, min, max) in its augment_list order
RAND_OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95), ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95),
    ("Equalize", 0, 1), ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30), ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3), ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)  # fmt: skip
_GEOMETRIC = (7, 9, 10, 12, 13)


def _rand_op(x: torch.Tensor, op: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Apply op ``op[b]`` with magnitude ``min + (max − min)·u[b]`` to every sample ``b`` (all on the device: each
    op is computed for the batch and selected per sample)."""
    lo = torch.tensor([o[1] for o in RAND_OPS], device=x.device)
    hi = torch.tensor([o[2] for o in RAND_OPS], device=x.device)
    v = lo[op] + (hi - lo)[op] * u

    def sel(k: int) -> torch.Tensor:
        return (op == k)[:, None, None, None]

    geometric = torch.isin(op, torch.tensor(_GEOMETRIC, device=x.device))[:, None, None, None]
    out = torch.where(geometric, _affine(x, _geometry(op, v, x.shape[2], x.shape[3])), x)
    gray = _gray(x)
    out = torch.where(sel(0), _autocontrast(x), out)
    out = torch.where(sel(1), _blend(torch.zeros_like(x), x, v), out)
    out = torch.where(sel(2), _blend(gray.expand_as(x), x, v), out)
    mean = torch.floor(gray.mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    out = torch.where(sel(3), _blend(mean.expand_as(x), x, v), out)
    out = torch.where(sel(4), _equalize(x), out)
    bits = torch.floor(v).clamp(1, 8)[:, None, None, None]
    q = torch.pow(2.0, 8 - bits)
    out = torch.where(sel(6), torch.floor(x / q) * q, out)
    out = torch.where(sel(8), _blend(_smooth(x), x, v), out)
    out = torch.where(sel(11), torch.where(x >= v[:, None, None, None], 255 - x, x), out)
    return out


def _cutout(x: torch.Tensor, u: torch.Tensor, fill: tuple[float, ...]) -> torch.Tensor:
    """The release's Cutout(v), v = U(0, 0.5): a square of side v·W at a uniform centre, clipped at the border
    (PIL rectangle, both corners inclusive), filled with ``fill``; v = 0 leaves the image unchanged."""
    b, c, h, w = x.shape
    side = u[:, 0] * 0.5 * w
    x0 = torch.floor((u[:, 1] * w - side / 2).clamp(min=0))
    y0 = torch.floor((u[:, 2] * h - side / 2).clamp(min=0))
    x1 = torch.minimum(x0 + side, torch.full_like(x0, w))
    y1 = torch.minimum(y0 + side, torch.full_like(y0, h))
    cols = torch.arange(w, device=x.device)[None, None, :]
    rows = torch.arange(h, device=x.device)[None, :, None]
    hole = ((cols >= x0[:, None, None]) & (cols <= x1[:, None, None]) & (rows >= y0[:, None, None])
            & (rows <= y1[:, None, None]) & (side > 0)[:, None, None])  # fmt: skip
    color = torch.tensor(fill[:c], device=x.device).view(1, c, 1, 1)
    return torch.where(hole[:, None], color, x)


def crop_flip(x: torch.Tensor, u: torch.Tensor, pad: int) -> torch.Tensor:
    """Random crop of the zero-padded image + horizontal flip from three uniforms per sample (float out)."""
    b, c, h, w = x.shape
    dy = torch.floor(u[:, 0] * (2 * pad + 1)).long()
    dx = torch.floor(u[:, 1] * (2 * pad + 1)).long()
    flip = u[:, 2] < 0.5
    xp = F.pad(x.float(), (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]
    ar = torch.arange(w, device=x.device)[None, :]
    cols = torch.where(flip[:, None], w - 1 - ar, ar) + dx[:, None]
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def randaugment_view(x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, pad: int = 4) -> torch.Tensor:
    """The MLKD release's strong view of uint8 images (8-bit values as float32; normalise afterwards)."""
    u = counter_uniform(seed, epoch, 1, index, 10)
    out = crop_flip(x, u[:, :3], pad)
    for slot in range(2):
        op = torch.floor(u[:, 3 + 2 * slot] * len(RAND_OPS)).long().clamp_(max=len(RAND_OPS) - 1)
        out = _u8(_rand_op(out, op, u[:, 4 + 2 * slot]))
    return _cutout(out, u[:, 7:10], (125.0, 123.0, 114.0))


def jitter_cutout_view(x: torch.Tensor, index: torch.Tensor, seed: int, epoch: int, pad: int = 4) -> torch.Tensor:
    """kdlab's earlier stand-in: crop + flip, brightness / contrast / saturation factors in [0.6, 1.4], one 16×16
    cutout (zeros)."""
    u = counter_uniform(seed, epoch, 2, index, 8)
    out = crop_flip(x, u[:, :3], pad) / 255
    j = 0.6 + 0.8 * u[:, 3:6]
    out = out * j[:, 0, None, None, None]
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * j[:, 1, None, None, None] + mean
    gray = out.mean(dim=1, keepdim=True)
    out = ((out - gray) * j[:, 2, None, None, None] + gray).clamp_(0, 1)
    h, w = out.shape[-2:]
    cy = torch.floor(u[:, 6] * h)[:, None, None]
    cx = torch.floor(u[:, 7] * w)[:, None, None]
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    hole = ((rows - cy).abs() < 8) & ((cols - cx).abs() < 8)
    return (out.masked_fill(hole[:, None], 0.0) * 255).round()


STRONG_VIEWS = {"randaugment": randaugment_view, "jitter_cutout": jitter_cutout_view}
