"""Teacher-output cache: compute the frozen teacher's outputs once per augmented view and replay them.

Augmentation parameters are a pure function of ``(augment seed, epoch, sample index)`` (random-resized crops of
streamed images included). View ``v`` (0-based) of the cache holds the teacher's outputs for every training sample
under the augmentation of epoch ``v + 1``; a run with ``teacher.cache=FILE`` replays view ``(epoch − 1) mod V`` and
augments the student's input with exactly that view's parameters. With ``V`` = number of epochs, this is the live run
(bit-identical with a float32 full cache); with fewer views it is the FKD-style approximation. The shuffle order,
initialisation and everything else still follow the run's own seed, so one cache serves every student, method and
seed of a sweep.

Two stores for the logits (``store``):

* ``full``: every logit in ``dtype`` (float32: exact replay). Default up to :data:`FULL_MAX_CLASSES` classes.
* ``topk``: for many classes (ImageNet): the ``k`` largest logits in fp16 with their int16 (int32 beyond 32,767
  classes) class indices, and *all* logits quantised to ``tail_bits`` (8 or 4) bits with a per-sample affine map over
  the range of the non-top-k ones (the top-k are then overwritten exactly); ``tail_bits=0`` keeps only a per-sample
  constant for the rest (logsumexp-matched at temperature 1, the FKD/ReLabel idea — measured far worse, see
  ``docs/imagenet.md``). At 1000 classes, k = 10 and 8 bits: 1,048 bytes per sample and view instead of 2,000
  (fp16) / 4,000 (fp32); 4 bits: 548 bytes.

File format: one safetensors file (memory-mapped on load), written view by view (a view's outputs are copied
asynchronously into pinned host buffers and written once per view, never synchronised per batch). Tensors
``logits.{v}`` (full) or ``logits.topv.{v}``, ``logits.topi.{v}``, ``logits.affine.{v}`` [, ``logits.q.{v}``]
(topk), and optionally ``pooled.{v}`` / ``prepool.{v}`` in ``dtype``; the metadata records what the cache was made
from and is checked before use.

Integrity (format v2): the header metadata ``kdlab.sha256`` holds the SHA-256 of every :data:`CHUNK_BYTES` chunk of
every tensor and of the header itself (with those digests blanked). The header is verified when the cache is opened;
each tensor's chunks are verified as its view is loaded for replay, so a large cache is checked while it streams,
never in a separate pass. One changed byte anywhere is a one-line :class:`~kdlab.errors.CheckpointError` naming the
file (exit code 2). Caches written before checksums existed (v1) are refused with a message to rebuild them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from kdlab.data.base import DataSource
from kdlab.engine.atomic import chmod_like_open, fsync_dir, new_temp, remove_stale_temps_of
from kdlab.errors import CheckpointError, ConfigError, DataError, WriteError
from kdlab.fileio import open_binary
from kdlab.models import ModelOutput
from kdlab.models.fold import frozen_features
from kdlab.models.output import STAGE_FIELDS

if TYPE_CHECKING:
    from kdlab.engine.fastpath import FastPath

FORMAT = "kdlab-teacher-cache-v2"
OLD_FORMATS = ("kdlab-teacher-cache-v1",)  # no checksums: refused with a message to rebuild
#: bytes per checksummed chunk of a tensor
CHUNK_BYTES = 16 << 20
#: header metadata entry holding the checksums (JSON: chunk size, header digest, per-tensor chunk digests)
SUMS_KEY = "kdlab.sha256"
_ZERO = "0" * 64
_HEX = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 100 << 20  # safetensors' own limit
FIELDS = ("logits", "pooled", "prepool")
STORES = ("auto", "full", "topk")
FULL_MAX_CLASSES = 200
"""``store=auto`` keeps every logit up to this many classes and switches to ``topk`` above."""
DEFAULT_TOPK = 10
DEFAULT_TAIL_BITS = 8
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16",
              torch.int32: "I32", torch.uint8: "U8"}  # fmt: skip


@dataclass
class CacheInfo:
    views: int
    num_samples: int
    num_classes: int
    augment_seed: int
    fields: tuple[str, ...]
    meta: dict[str, Any]


# ---------------------------------------------------------------------------------------------------------------------
# top-k + quantised-tail compression of logits (pure functions of tensors)


def compress_logits(logits: torch.Tensor, k: int, tail_bits: int) -> dict[str, torch.Tensor]:
    """Compress N×K logits: ``topv`` (fp16 N×k), ``topi`` (int16/int32 N×k), ``affine`` (fp32 N×2: offset, step)
    and, for ``tail_bits`` 8 or 4, ``q`` (uint8 N×⌈K·bits/8⌉, all logits quantised over the non-top-k range)."""
    z = logits.float()
    n, classes = z.shape
    k = min(k, classes - 1)
    topv, topi = z.topk(k, dim=1)
    out = {"topv": topv.half(), "topi": topi.to(torch.int16 if classes <= 32767 else torch.int32)}
    if tail_bits == 0:  # one constant: the tail's softmax mass at temperature 1 is kept
        rest = z.scatter(1, topi, float("-inf"))
        fill = torch.logsumexp(rest, dim=1) - float(np.log(classes - k))
        out["affine"] = torch.stack([fill, torch.zeros_like(fill)], dim=1)
        return out
    levels = (1 << tail_bits) - 1
    lo = z.scatter(1, topi, float("inf")).amin(dim=1)
    hi = z.scatter(1, topi, float("-inf")).amax(dim=1)
    step = ((hi - lo) / levels).clamp_min(1e-12)
    q = ((z - lo[:, None]) / step[:, None]).round_().clamp_(0, levels).to(torch.uint8)
    if tail_bits == 4:
        q = torch.nn.functional.pad(q, (0, classes % 2))
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    out["affine"] = torch.stack([lo, step], dim=1)
    out["q"] = q
    return out


def decompress_logits(parts: dict[str, torch.Tensor], num_classes: int, tail_bits: int) -> torch.Tensor:
    """Float32 N×K logits from :func:`compress_logits` parts (top-k exact to fp16, the rest dequantised)."""
    affine = parts["affine"].float()
    if tail_bits == 0:
        z = affine[:, :1].expand(-1, num_classes).clone()
    else:
        q = parts["q"]
        if tail_bits == 4:
            q = torch.stack([q & 15, q >> 4], dim=2).flatten(1)[:, :num_classes]
        z = q.float() * affine[:, 1:2] + affine[:, :1]
    return z.scatter_(1, parts["topi"].long(), parts["topv"].float())


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _chunk_digests(data: memoryview, chunk: int) -> list[str]:
    """SHA-256 hex digests of consecutive ``chunk``-byte slices of ``data`` (one empty digest for no bytes)."""
    return [hashlib.sha256(data[i : i + chunk]).hexdigest() for i in range(0, max(len(data), 1), chunk)]


def _blank_sums(text: str) -> str:
    """The checksum entry with every digest replaced by zeros (what the header digest is computed over)."""
    return _HEX.sub(_ZERO, text)


class CacheWriter:
    """A checksummed safetensors file written tensor by tensor (the header first, all shapes being known, then raw
    bytes in header order); the chunk digests are computed as the bytes go out and written into the header's
    reserved checksum entry at :meth:`finish`, just before the file is renamed into place."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path, self.meta = path, meta
        self.tmp: str | None = None
        self.f: BinaryIO | None = None

    def start(self, layout: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        header: dict[str, Any] = {}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
            size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._order.append((name, size))
            offset += size
        self._sums: dict[str, Any] = {"chunk": CHUNK_BYTES, "header": _ZERO, "tensors": {
            name: [_ZERO] * max(1, -(-size // CHUNK_BYTES)) for name, size in self._order}}  # fmt: skip
        blank = json.dumps(self._sums, separators=(",", ":"))
        header["__metadata__"] = {"kdlab": json.dumps(self.meta), SUMS_KEY: blank}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._header = struct.pack("<Q", len(raw)) + raw
        self._blank = json.dumps(blank).encode()  # the entry as it appears inside the header (a quoted string)
        self._at = self._header.index(self._blank)
        self.path.parent.mkdir(parents=True, exist_ok=True)  # checked writable beforehand (check_output_file)
        fd, self.tmp = new_temp(self.path)  # locked while written: a later cleaner never takes it for a dead one's
        self.f = os.fdopen(fd, "wb")
        chmod_like_open(fd)  # a shared cache is readable like any file the user writes (not mkstemp's 0600)
        self.f.write(self._header)
        self._next = 0

    def write(self, t: torch.Tensor) -> None:
        assert self.f is not None
        name, size = self._order[self._next]
        data = memoryview(t.contiguous().view(torch.uint8).numpy().reshape(-1))
        if len(data) != size:
            raise ValueError(f"tensor {name}: {len(data)} bytes, the header says {size}")
        self._sums["tensors"][name] = _chunk_digests(data, self._sums["chunk"])
        self.f.write(data)
        self._next += 1

    def finish(self) -> None:
        assert self.f is not None and self.tmp is not None
        self._sums["header"] = hashlib.sha256(self._header).hexdigest()  # taken with the digests blanked
        filled = json.dumps(json.dumps(self._sums, separators=(",", ":"))).encode()
        assert len(filled) == len(self._blank)
        self.f.seek(self._at)
        self.f.write(filled)
        self.f.flush()
        os.fsync(self.f.fileno())
        os.replace(self.tmp, self.path)  # still locked until closed below
        self.tmp = None
        self.f.close()
        self.f = None
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass


def cache_refusal(method_name: str, method: Any) -> str | None:
    """Why a teacher cache cannot serve the method ``method_name`` (a :class:`kdlab.methods.Method`), as a one-line
    message, or ``None`` when it can: the method reads stage features, which a cache does not hold, or runs the
    teacher's BatchNorms on each batch's statistics (``method.teacher_bn=train``), which depend on the batch's
    composition and cannot be replayed."""
    stage_fields = sorted(set(method.teacher_outputs) & set(STAGE_FIELDS))
    if stage_fields:
        return (f"method '{method_name}' reads the teacher's {stage_fields[0]}, which a teacher cache does not hold; "
                "unset teacher.cache (the teacher then runs live)")  # fmt: skip
    if getattr(method, "teacher_bn", "eval") == "train":
        return (f"method '{method_name}' runs the teacher's BatchNorms on each batch's statistics "
                "(method.teacher_bn=train, as released), which a teacher cache cannot replay; unset teacher.cache, "
                "or set method.teacher_bn=eval")  # fmt: skip
    return None


def check_store(store: str, topk: int = DEFAULT_TOPK, tail_bits: int = DEFAULT_TAIL_BITS) -> None:
    """One-line errors for a bad store name, ``topk`` or ``tail_bits``."""
    if store not in STORES:
        raise ConfigError(f"unknown cache store '{store}'; choose from {', '.join(STORES)}")
    if topk < 1 or tail_bits not in (0, 4, 8):
        raise ConfigError(f"--topk must be at least 1 and --tail-bits 0, 4 or 8 (got {topk} and {tail_bits})")


def resolve_store(store: str, num_classes: int) -> str:
    """``full`` or ``topk`` (``auto``: topk above :data:`FULL_MAX_CLASSES` classes)."""
    if store == "auto":
        return "full" if num_classes <= FULL_MAX_CLASSES else "topk"
    return store


def build_cache(
    teacher: nn.Module,
    data: DataSource,
    views: int,
    out: str | Path,
    *,
    augment_seed: int,
    fields: tuple[str, ...] = ("logits",),
    dtype: torch.dtype = torch.float16,
    batch_size: int = 512,
    meta: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    store: str = "auto",
    topk: int = DEFAULT_TOPK,
    tail_bits: int = DEFAULT_TAIL_BITS,
    fast: FastPath | None = None,
    fold_bn: bool = True,
) -> Path:
    """Run ``teacher`` over ``views`` augmented passes of the training split and write the cache atomically.

    ``fast`` (a :class:`kdlab.engine.fastpath.FastPath`) runs the teacher with the training run's autocast and
    memory format, so the cached outputs are those the live run would compute; ``fold_bn`` (``teacher.fold_bn``)
    folds the teacher's BatchNorms into its convolutions as the live run does.
    """
    if views < 1:
        raise ConfigError("--views must be at least 1")
    bad = [f for f in fields if f not in FIELDS]
    if bad:
        raise ConfigError(f"unknown cache field '{bad[0]}'; choose from {', '.join(FIELDS)}")
    check_store(store, topk, tail_bits)
    store = resolve_store(store, data.num_classes)
    teacher.eval()
    forward: Callable[[torch.Tensor], ModelOutput]
    example = data.example_batch(2)
    if fast is not None:  # outside inference mode: the teacher's parameters stay ordinary tensors
        forward = fast.frozen_forward(teacher, example, fold_bn)[0]
    else:
        forward = frozen_features(teacher, example, fold_bn)[0]
    autocast = fast.autocast if fast is not None else contextlib.nullcontext
    n = data.num_train
    order = torch.arange(n)
    info = {
        "format": FORMAT, "views": views, "num_samples": n, "num_classes": data.num_classes,
        "augment_seed": augment_seed, "fields": list(fields), "dtype": str(dtype).replace("torch.", ""),
        "store": store, "dataset": data.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {}),
        **({"samples": data.sample_keys} if getattr(data, "sample_keys", None) else {}),  # which samples (shards)
    }  # fmt: skip
    if store == "topk":
        info.update(topk=min(topk, data.num_classes - 1), tail_bits=tail_bits)
    out = Path(out)
    remove_stale_temps_of(out)  # `.NAME.XXXXXXXX.tmp` of killed writers of this file (a live writer's is kept)
    writer = CacheWriter(out, info)
    buffers: dict[str, torch.Tensor] = {}
    pin = False
    try:
        for v in range(views):
            start = 0
            batches = data.train_batches(batch_size, seed=augment_seed, epoch=v + 1, indices=order,
                                         augment_seed=augment_seed, augment_epoch=v + 1)  # fmt: skip
            disorder: torch.Tensor | None = None
            with torch.inference_mode():
                for x, _y, _idx in batches:
                    with autocast():
                        out_v = forward(x)
                    parts = _parts(out_v, fields, store, dtype, topk, tail_bits)
                    if not buffers:
                        pin = x.device.type == "cuda"
                        buffers = {name: torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                                   for name, t in parts.items()}  # fmt: skip
                        writer.start([(f"{name}.{w}", t.dtype, tuple(t.shape)) for w in range(views)
                                      for name, t in buffers.items()])  # fmt: skip
                    end = start + len(x)
                    if end != min(start + batch_size, n):  # rows are written in order: nothing may be skipped
                        raise DataError(f"teacher cache: {data.name} skipped unreadable training samples; remove "
                                        "them (or fix them) before caching the teacher")  # fmt: skip
                    # row = sample index (its key): checked on the device, read once per view (no sync per batch)
                    off = (_idx != torch.arange(start, end, device=_idx.device)).any()
                    disorder = off if disorder is None else disorder | off
                    for name, t in parts.items():  # asynchronous device → pinned host copies, no sync per batch
                        buffers[name][start:end].copy_(t, non_blocking=True)
                    start = end
            if pin:
                torch.cuda.synchronize()  # once per view, before its buffers are written
            if disorder is not None and bool(disorder):
                raise DataError(f"teacher cache: {data.name} delivered training samples out of index order")
            for t in buffers.values():
                writer.write(t)
            if progress:
                progress(v + 1, views)
        writer.finish()
    except OSError as err:
        writer.abort()
        raise WriteError(f"could not write {out}: {err.strerror or err}; nothing was replaced") from None
    except BaseException:
        writer.abort()
        raise
    return out


def _parts(out: ModelOutput, fields: tuple[str, ...], store: str, dtype: torch.dtype, topk: int,
           tail_bits: int) -> dict[str, torch.Tensor]:  # fmt: skip
    parts: dict[str, torch.Tensor] = {}
    for f in fields:
        t = getattr(out, f)
        if f == "logits" and store == "topk":
            parts.update({f"logits.{k}": v for k, v in compress_logits(t, topk, tail_bits).items()})
        else:
            parts[f] = t.to(dtype)
    return parts


# ---------------------------------------------------------------------------------------------------------------------
# replay


def read_cache_header(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kdlab metadata and checksum record of a teacher cache, after checking the header against its SHA-256.

    Anything wrong — not a safetensors header, no kdlab metadata, an older format without checksums, a changed
    header byte — is a one-line :class:`~kdlab.errors.CheckpointError` naming the file."""

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a usable kdlab teacher cache: {why}")

    with open_binary(path, "cache", "teacher cache", CheckpointError) as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        size = os.fstat(f.fileno()).st_size
        if n < 2 or n > min(_MAX_HEADER, size - 8):
            raise refuse("no safetensors header (truncated or not a cache)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        stored = header["__metadata__"]
        meta = json.loads(stored["kdlab"])
    except (ValueError, KeyError, TypeError):
        raise refuse("damaged header (its metadata does not parse)") from None
    if not isinstance(meta, dict):
        raise refuse("damaged header (its metadata does not parse)")
    if meta.get("format") in OLD_FORMATS:
        raise CheckpointError(f"teacher cache {path} was made by an older kdlab without checksums; rebuild it with "
                              "kdlab cache-teacher (same arguments)")  # fmt: skip
    if meta.get("format") != FORMAT:
        raise refuse(f"format {meta.get('format')!r}")
    text = stored.get(SUMS_KEY)
    try:
        sums = json.loads(text)
        ok = isinstance(sums["chunk"], int) and sums["chunk"] > 0 and isinstance(sums["tensors"], dict)
        blank = json.dumps(_blank_sums(text)).encode()
        at = raw.index(json.dumps(text).encode())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise refuse("damaged header (its checksum record does not parse)")
    signed = head + raw[:at] + blank + raw[at + len(blank) :]
    if hashlib.sha256(signed).hexdigest() != sums["header"]:
        raise CheckpointError(f"teacher cache {path} is damaged: its header does not match its recorded SHA-256; "
                              "rebuild it with kdlab cache-teacher")  # fmt: skip
    return meta, sums


class TeacherCache:
    """A cache opened for replay: ``outputs(epoch, index)`` gives the teacher's outputs for a batch."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        self.path = Path(path)
        meta, self._sums = read_cache_header(self.path)  # missing, a folder, FIFO or device: named; then checksums
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as err:
            raise CheckpointError(f"{self.path} is not a readable teacher cache ({type(err).__name__})") from None
        counts = {k: meta.get(k) for k in ("views", "num_samples", "num_classes")}
        bad = next((k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1), None)
        if bad is not None or not isinstance(meta.get("augment_seed"), int) or not isinstance(meta.get("fields"), list):
            what = f"{bad}={counts[bad]!r}" if bad else "augment_seed / fields missing"
            raise CheckpointError(f"{self.path}: damaged teacher cache metadata ({what})")
        self.info = CacheInfo(meta["views"], meta["num_samples"], meta["num_classes"], meta["augment_seed"],
                              tuple(meta["fields"]), meta)  # fmt: skip
        self.store = meta.get("store", "full")
        self.device = torch.device(device)
        self._view = -1
        self._tensors: dict[str, torch.Tensor] = {}

    def _verified(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from the file, each chunk checked against its recorded SHA-256."""
        t = self._file.get_tensor(name)
        want = self._sums["tensors"].get(name)
        data = memoryview(t.contiguous().view(torch.uint8).numpy().reshape(-1))
        got = _chunk_digests(data, self._sums["chunk"])
        if want != got:
            bad = next((i for i, (a, b) in enumerate(zip(want or [], got)) if a != b), len(want or []))
            first, last = bad * self._sums["chunk"], min((bad + 1) * self._sums["chunk"], len(data))
            raise CheckpointError(
                f"teacher cache {self.path} is damaged: bytes {first}-{last} of tensor '{name}' do not match their "
                "recorded SHA-256; rebuild it with kdlab cache-teacher"
            )
        return t

    def check(self, data: DataSource, teacher_fingerprint: str | None, needs: tuple[str, ...]) -> None:
        """Refuse a cache made for other data, another teacher, or lacking outputs the method needs."""
        i = self.info
        if i.num_samples != data.num_train or i.num_classes != data.num_classes or i.meta.get("dataset") != data.name:
            raise ConfigError(
                f"teacher cache {self.path} was made for {i.meta.get('dataset')} with {i.num_samples} samples and "
                f"{i.num_classes} classes; this run has {data.name} with {data.num_train} and {data.num_classes}"
            )
        samples, ours = i.meta.get("samples"), getattr(data, "sample_keys", None)
        if samples and ours and samples != ours:
            raise ConfigError(f"teacher cache {self.path} was made for other samples ({samples}); this run reads "
                              f"{ours}")  # fmt: skip
        want = i.meta.get("teacher_sha256")
        if teacher_fingerprint and want and teacher_fingerprint != want:
            raise ConfigError(f"teacher cache {self.path} was made from another teacher checkpoint")
        missing = [f for f in needs if f not in i.fields]
        if missing:
            raise ConfigError(f"teacher cache {self.path} lacks '{missing[0]}' (rebuild with --fields {','.join(needs)})")

    def view_of(self, epoch: int) -> int:
        return (epoch - 1) % self.info.views

    def augment_epoch(self, epoch: int) -> int:
        """The augmentation epoch whose parameters the student must use in ``epoch``."""
        return self.view_of(epoch) + 1

    def outputs(self, epoch: int, index: torch.Tensor) -> ModelOutput:
        v = self.view_of(epoch)
        if v != self._view:  # load one view at a time onto the training device (names: ``<field>[.<part>].<view>``)
            names = [k for k in self._file.keys() if k.rsplit(".", 1)[1] == str(v)]
            self._tensors = {k.rsplit(".", 1)[0]: self._verified(k).to(self.device) for k in names}
            self._view = v
        got: dict[str, torch.Tensor] = {}
        for f in self.info.fields:
            if f == "logits" and self.store == "topk":
                parts = {k[len("logits."):]: t[index] for k, t in self._tensors.items() if k.startswith("logits.")}
                got[f] = decompress_logits(parts, self.info.num_classes, int(self.info.meta["tail_bits"]))
            else:
                got[f] = self._tensors[f][index].float()
        return ModelOutput(got.get("logits"), got.get("prepool"), got.get("pooled"))  # type: ignore[arg-type]
