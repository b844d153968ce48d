"""WebDataset shards (``data.name: webdataset``): images streamed from tar files, read sequentially.

An export (``kdlab export-images SRC --format webdataset``, :func:`kdlab.data.export.export_webdataset`) is a folder
with ``train-NNNNNN.tar`` and ``val-NNNNNN.tar`` shards and ``dataset.json``. Each shard opens with a ``__kdlab__``
member (its export id, split, position and sample count; standard WebDataset readers skip ``__…__`` names), then one
sample per key: ``KEY.jpg`` / ``KEY.png`` (the image bytes) and ``KEY.cls`` (the class index as text). ``dataset.json``
records the classes (sorted folder names, as for image folders), and per split the shards in order with their
sample counts and labels, so that sizes and labels are known without reading a shard. A sample's index is its
position in that order (the key of a kdlab export is the same number), which is what augmentation, teacher caches,
CRD's memory and skipped-sample counts are keyed by.

Where the shards are: ``data.root: DIR`` (the export folder), or ``data.urls: {train: …, val: …}`` with lists,
brace patterns (``train-{000000..000099}.tar``), ``file:`` paths, ``http(s)://`` (read with curl) or ``pipe:COMMAND``
(a shell command writing the shard to stdout, e.g. ``pipe:aws s3 cp s3://bucket/train-000000.tar -``: it runs code,
so it needs ``--trust-code``), opened by the ``webdataset`` package (``webdataset.gopen``). The URLs of a split name
the export's shards in order; ``dataset.json`` comes from ``data.root`` (a folder or the file) or from beside the
first train shard. Local shards are read through :mod:`kdlab.fileio` (regular files, ``KDLAB_MAX_BYTES_ARCHIVE``).

One epoch reads every sample exactly once over all ranks and workers. The plan (:func:`rank_plan`) is a pure
function of ``(seed, epoch)``, the shard counts, the number of ranks and workers: the shards in a seeded order, cut
into one contiguous range per rank (as many samples as the rank's parts of the global batches) and per worker (as
many as its batches; worker ``w`` delivers steps ``w, w + W, …``, the DataLoader's round-robin), each worker passing
its range through a seeded shuffle buffer (``data.shuffle_buffer`` samples, kept encoded). A partly read shard is
skipped forward without decoding. Resume is exact at epoch boundaries (and within an epoch for the same number of
workers); a sample's augmentation is that of an image-folder sample (:mod:`kdlab.data.images`), a function of
``(seed, epoch, index)``. Evaluation reads the shards in order. Peak memory is the shuffle buffers and the batches in
flight, whatever the dataset size.

Damage is named: a shard that cannot be opened or read (corrupt, truncated, a failing URL), a shard of another export
or class count, a sample without a label or an image, a label differing from ``dataset.json`` — one line naming the
shard and the member, or, with ``data.skip_bad_images``, skipped (every sample it costs) and counted.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from kdlab.data.augment import ImageAugment
from kdlab.data.base import DATASETS, Batch, DataSource, check_split
from kdlab.data.decode import describe_error
from kdlab.data.images import IMAGE_EXTENSIONS, ImageViews, build_image_transform, build_image_views
from kdlab.data.stream import BadSample, Item, StreamBase, View, collate, worker_init
from kdlab.errors import ConfigError, DataError, KdlabError
from kdlab.fileio import check_file, max_bytes
from kdlab.seeding import derive_seed, generator

if TYPE_CHECKING:
    from kdlab.config import DataConfig

FORMAT = "kdlab-webdataset-v1"
META_FILE = "dataset.json"
HEADER = "__kdlab__"
SPLITS = {"train": "train", "test": "val"}  # kdlab split -> the export's split (shard prefix, dataset.json key)
IMAGE_SUFFIXES = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / suffix split: key up to the first dot


# ---------------------------------------------------------------------------------------------------------------------
# the export's description


@dataclass(frozen=True)
class Shard:
    """One shard: where it is, its name in ``dataset.json``, the samples used (``count``; fewer than ``stored`` after
    ``take_first``) and the index of its first sample."""

    url: str
    name: str
    count: int
    offset: int
    stored: int


@dataclass
class SplitShards:
    """The shards of one split, in order, and every sample's label."""

    shards: list[Shard]
    labels: np.ndarray

    @property
    def count(self) -> int:
        return len(self.labels)

    def take_first(self, n: int) -> SplitShards:
        kept = []
        for s in self.shards:
            if s.offset >= n:
                break
            kept.append(Shard(s.url, s.name, min(s.count, n - s.offset), s.offset, s.stored))
        return SplitShards(kept, self.labels[:n])


@dataclass
class Export:
    """``dataset.json`` of an export, its shards resolved to URLs."""

    export_id: str
    num_classes: int
    classes: list[str]
    transform: str | None
    splits: dict[str, SplitShards] = field(default_factory=dict)


def _is_local(url: str) -> bool:
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", url)
    return scheme is None or len(scheme.group(1)) == 1 or scheme.group(1) == "file"


def _local_path(url: str) -> str:
    if not url.startswith("file:"):
        return url
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return url2pathname(urlparse(url).path)


def _basename(url: str) -> str | None:
    """The file name a URL ends with (``None`` for ``pipe:`` commands)."""
    if url.startswith("pipe:"):
        return None
    return url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]


def _read_url(url: str, kind: str, what: str) -> bytes:
    """The content of a local file (through kdlab.fileio) or a URL (webdataset.gopen), at most the limit of ``kind``."""
    from kdlab.fileio import read_bytes

    if _is_local(url):
        return read_bytes(_local_path(url), kind, what=what, error=DataError)
    limit = max_bytes(kind)
    try:
        with _open_stream(url) as f:
            data = f.read(limit + 1)
    except KdlabError:
        raise
    except Exception as err:
        raise DataError(f"cannot read {what} {url} ({describe_error(err)})") from None
    if len(data) > limit:
        raise DataError(f"{what} {url} is over the limit for {kind} files")
    if not data:
        raise DataError(f"cannot read {what} {url} (nothing was received)")
    return data


def _check_commands(urls: list[str]) -> None:
    """``pipe:`` URLs run shell commands: refused, before anything runs, without ``--trust-code``."""
    from kdlab.trust import trust_enabled

    command = next((u for u in urls if u.startswith("pipe:")), None)
    if command is not None and not trust_enabled():
        raise ConfigError(f"data.urls names a shell command ({command[:60]}): pipe: URLs run code, so they need "
                          "--trust-code (or KDLAB_TRUST_CODE=1)")  # fmt: skip


def _open_stream(url: str) -> IO[bytes]:
    """A remote shard or ``pipe:`` command opened by the webdataset package (``pipe:`` only under --trust-code)."""
    _check_commands([url])
    from webdataset.gopen import gopen  # (the package's top-level `gopen` is the function, not this module)

    return gopen(url, "rb")


def expand_urls(spec: str | list[str], what: str) -> list[str]:
    """A split's shard URLs: each string brace-expanded (``train-{000..009}.tar``) and ``::``-split, as webdataset
    does."""
    from webdataset.shardlists import expand_urls as wds_expand

    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in items:
        try:
            urls.extend(wds_expand(item))
        except Exception as err:
            raise ConfigError(f"{what}: cannot expand '{item}' ({describe_error(err)})") from None
    return urls


def _int(value: Any, what: str, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise DataError(f"{what} must be an integer ≥ {low}, got {value!r}")
    return value


def parse_export(text: str, where: str) -> dict[str, Any]:
    """``dataset.json`` checked for shape (format, classes, shards with counts and labels); names ``where``."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{where} is not a kdlab WebDataset export (format {got!r}, expected {FORMAT})")
    k = _int(meta.get("num_classes"), f"{where}: num_classes", 2)
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) != k:
        raise DataError(f"{where}: classes must list {k} class names")
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{where}: no splits")
    for split in SPLITS.values():
        shards = (splits.get(split) or {}).get("shards") if isinstance(splits.get(split), dict) else None
        if not isinstance(shards, list):
            raise DataError(f"{where}: the {split} split is missing")
        if not shards:
            raise DataError(f"{where}: the {split} split lists no shards")
        for i, s in enumerate(shards):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("labels"), list):
                raise DataError(f"{where}: {split} shard {i} needs a name and labels")
            n = _int(s.get("count"), f"{where}: {split} shard {s['name']} count")
            if len(s["labels"]) != n:
                raise DataError(f"{where}: {split} shard {s['name']} lists {len(s['labels'])} labels for {n} samples")
    return meta


def load_export(cfg: DataConfig) -> Export:
    """Find and check ``dataset.json`` and the shard URLs of each split (from ``data.root`` / ``data.urls``)."""
    urls: dict[str, list[str]] = {}
    if cfg.urls:
        names = {"train": "train", "val": "val", "test": "val"}
        for key, spec in cfg.urls.items():
            if key not in names:
                raise ConfigError(f"data.urls has a '{key}' entry; use train and val")
            urls[names[key]] = expand_urls(spec, f"data.urls.{key}")
        for split in SPLITS.values():
            if not urls.get(split):
                raise DataError(f"webdataset: data.urls lists no {split} shards")
        _check_commands([u for given in urls.values() for u in given])
    if cfg.root:
        root = Path(cfg.root)
        meta_url = str(root / META_FILE) if root.is_dir() else str(root)
        if not cfg.urls and not root.is_dir():
            raise DataError(f"webdataset: data.root {root} is not a folder (expected an export: {META_FILE}, "
                            "train-*.tar, val-*.tar)")  # fmt: skip
    elif cfg.urls:
        first = urls["train"][0]
        if first.startswith("pipe:"):
            raise ConfigError(f"webdataset: with pipe: URLs set data.root to the export's {META_FILE}")
        meta_url = first.rstrip("/").rsplit("/", 1)[0] + "/" + META_FILE if "/" in first else META_FILE
    else:
        raise DataError("webdataset: set data.root to an export folder (kdlab export-images --format webdataset), "
                        "or data.urls to its shards")  # fmt: skip
    meta = parse_export(_read_url(meta_url, "json", "WebDataset metadata").decode("utf-8", "replace"), meta_url)
    export = Export(str(meta.get("export_id", "")), meta["num_classes"], [str(c) for c in meta["classes"]],
                    meta.get("transform"))  # fmt: skip
    base = meta_url.rsplit("/", 1)[0] if "/" in meta_url else "."
    for split in SPLITS.values():
        listed = meta["splits"][split]["shards"]
        given = urls.get(split) or [f"{base}/{s['name']}" for s in listed]
        if len(given) != len(listed):
            raise DataError(f"webdataset: data.urls lists {len(given)} {split} shards, {meta_url} has {len(listed)}")
        shards, offset = [], 0
        labels = []
        for url, s in zip(given, listed):
            name = _basename(url)
            if name is not None and name != s["name"]:
                raise DataError(f"webdataset: {split} shard {url} is not {s['name']}, the shard {meta_url} lists "
                                "at that position")  # fmt: skip
            if _is_local(url):
                check_file(_local_path(url), "archive", what=f"{split} shard", error=DataError)
            shards.append(Shard(url, s["name"], s["count"], offset, s["count"]))
            labels.append(np.asarray(s["labels"], dtype=np.int64))
            offset += s["count"]
        y = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        if len(y) and (y.min() < 0 or y.max() >= export.num_classes):
            raise DataError(f"{meta_url}: {split} labels must lie in [0, {export.num_classes}), "
                            f"found {int(y.min())}..{int(y.max())}")  # fmt: skip
        if not len(y):
            raise DataError(f"webdataset: the {split} shards of {meta_url} hold no samples")
        export.splits[split] = SplitShards(shards, y)
    return export


# ---------------------------------------------------------------------------------------------------------------------
# reading shards


Record = tuple[int, bytes | None, int, str]  # (index, image bytes or None when bad, label, name or reason)


class _ShardStream:
    """One shard read member by member, grouped into samples: ``(position, key, {suffix: bytes}, first member)``."""

    def __init__(self, shard: Shard, split: str, export_id: str, num_classes: int) -> None:
        self.shard, self.split = shard, split
        self.export_id, self.num_classes = export_id, num_classes
        self.position = 0  # samples read so far
        self.done = False
        self._file: IO[bytes] | None = None
        self._tar: tarfile.TarFile | None = None
        self._pending: tarfile.TarInfo | None = None
        self._limit = max_bytes("image")

    def where(self, member: str | None = None) -> str:
        return f"webdataset shard {self.shard.url}" + (f" member {member}" if member else "")

    def open(self) -> None:
        url = self.shard.url
        try:
            if _is_local(url):
                path = check_file(_local_path(url), "archive", what=f"{self.split} shard", error=DataError)
                self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
                self._tar = tarfile.open(fileobj=self._file, mode="r:")
            else:
                self._file = _open_stream(url)
                self._tar = tarfile.open(fileobj=self._file, mode="r|")
        except KdlabError:
            raise
        except Exception as err:
            raise DataError(f"cannot read {self.where()} ({describe_error(err)}{self._exit_status()})") from None
        self._check_header()

    def _exit_status(self) -> str:
        """Why a ``pipe:`` / curl stream ended (the command's exit status), as ``"; …"``; ``""`` if it did not fail."""
        f, self._file = self._file, None
        if f is None or not hasattr(f, "proc"):
            return ""
        try:
            f.close()
        except Exception:  # noqa: BLE001 (webdataset's Pipe raises IOError naming the exit status)
            status = getattr(f, "status", None)
            cmd = f.args[0][0] if getattr(f, "args", None) else None
            name = os.path.basename(cmd[0]) if isinstance(cmd, list) and cmd else "the command"
            return f"; {name} exited with status {status}"
        return ""

    def _next_member(self) -> tarfile.TarInfo | None:
        assert self._tar is not None
        while True:
            info = self._tar.next()
            self._tar.members = []  # keep memory flat over a long shard
            if info is None or info.isreg():
                return info

    def _check_header(self) -> None:
        info = self._member()
        if info is None or info.name != HEADER:
            raise DataError(f"{self.where()} has no {HEADER} header: not a shard of a kdlab export (re-export it "
                            "with kdlab export-images --format webdataset)")  # fmt: skip
        try:
            head = json.loads(self._read(info))
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{self.where(HEADER)} is not valid JSON") from None
        if not isinstance(head, dict):
            raise DataError(f"{self.where(HEADER)} is not a kdlab shard header")
        if head.get("num_classes") != self.num_classes:
            raise DataError(f"{self.where()} was written for {head.get('num_classes')} classes, the export's "
                            f"{META_FILE} has {self.num_classes}: shards of different datasets")  # fmt: skip
        if self.export_id and head.get("export_id") != self.export_id:
            raise DataError(f"{self.where()} belongs to another export ({head.get('export_id')}, not "
                            f"{self.export_id}): shards of different exports")  # fmt: skip
        if head.get("split") != self.split or head.get("count") != self.shard.stored:
            raise DataError(f"{self.where()} is a {head.get('split')} shard of {head.get('count')} samples; "
                            f"{META_FILE} lists it as {self.split} with {self.shard.stored}")  # fmt: skip

    def _member(self) -> tarfile.TarInfo | None:
        if self._pending is not None:
            info, self._pending = self._pending, None
            return info
        return self._next_member()

    def _read(self, info: tarfile.TarInfo) -> bytes:
        assert self._tar is not None
        if info.size > self._limit:
            raise BadSample(f"{self.where(info.name)} is {info.size} bytes, over the image limit "
                            "(raise it with KDLAB_MAX_BYTES_IMAGE)")  # fmt: skip
        f = self._tar.extractfile(info)
        data = f.read() if f is not None else b""
        if len(data) != info.size:
            raise tarfile.ReadError(f"truncated: {len(data)} of {info.size} bytes")
        return data

    def next_sample(self, decode: bool) -> tuple[str, dict[str, bytes]] | None:
        """The next sample's key and members (bytes read only when ``decode``); ``None`` at the end. Raises
        :class:`DataError` for damage that ends the shard, :class:`BadSample` for one bad sample."""
        try:
            info = self._member()
            if info is None:
                self.done = True
                return None
            m = _KEY.match(info.name)
            if m is None:
                raise BadSample(f"{self.where(info.name)}: a member name without a key.suffix form")
            key = m.group(1)
            members: dict[str, bytes] = {}
            bad: BadSample | None = None
            while info is not None:
                m = _KEY.match(info.name)
                if m is None or m.group(1) != key:
                    self._pending = info
                    break
                suffix = m.group(2).lower()
                if suffix in members:
                    bad = bad or BadSample(f"{self.where(info.name)}: two members named {key}.{suffix}")
                elif bad is None:
                    try:
                        members[suffix] = self._read(info) if decode or suffix == "cls" else b""
                    except BadSample as err:
                        bad = err  # the sample's other members are still read past: positions stay right
                info = self._next_member()
            self.position += 1
            if bad is not None:
                raise bad
            return key, members
        except (BadSample, DataError):
            raise
        except Exception as err:  # tarfile.ReadError / EOFError (truncated, corrupt), a failing URL or command
            raise DataError(f"cannot read {self.where()} after {self.position} samples ({describe_error(err)}"
                            f"{self._exit_status()})") from None  # fmt: skip

    def close(self) -> None:
        try:
            if self._tar is not None:
                self._tar.close()
            if self._file is not None:
                self._file.close()  # a pipe: checks the command's exit status
        except Exception:  # noqa: BLE001 (a command stopped early by SIGPIPE, a curl cut short: the samples are read)
            pass
        self._tar = self._file = None


def _sample_record(stream: _ShardStream, key: str, members: dict[str, bytes], index: int, label_of: int) -> Record:
    """A grouped sample → ``(index, image, label, name)``; a missing or wrong label or image is a bad record."""
    where = stream.where(f"{key}.*")
    image = next((s for s in members if s in IMAGE_SUFFIXES), None)
    if image is None:
        return index, None, -1, f"{where}: no image member ({', '.join(IMAGE_SUFFIXES[:3])}, …)"
    if "cls" not in members:
        return index, None, -1, f"{where}: sample without a label ({key}.cls)"
    try:
        label = int(members["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return index, None, -1, f"{stream.where(key + '.cls')}: not a class index"
    if label != label_of:
        return index, None, -1, (f"{stream.where(key + '.cls')}: label {label}, but {META_FILE} lists {label_of} "
                                 f"for sample {index}")  # fmt: skip
    return index, members[image], label, stream.where(f"{key}.{image}")


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (ordinals among the shard's kept samples) of shard ``shard``."""

    shard: int
    start: int
    stop: int


class ShardReader:
    """Reads segments of one split's shards in order, one record per planned sample: a sample, or the reason it is
    missing (every sample a damaged shard costs is reported, so batch sizes stay as planned)."""

    def __init__(self, split: str, shards: SplitShards, export_id: str, num_classes: int,
                 kept: dict[int, np.ndarray] | None = None) -> None:  # fmt: skip
        self.split, self.shards = split, shards
        self.export_id, self.num_classes = export_id, num_classes
        self.kept = kept  # per shard: the kept positions (sorted), when a subset is read

    def positions(self, seg: Segment) -> np.ndarray:
        if self.kept is None:
            return np.arange(seg.start, seg.stop)
        return self.kept[seg.shard][seg.start : seg.stop]

    def records(self, segments: list[Segment]) -> Iterator[Record]:
        """Records of ``segments`` in order (samples between them are read past without their bytes)."""
        stream: _ShardStream | None = None
        broken: dict[int, str] = {}
        try:
            for seg in segments:
                shard = self.shards.shards[seg.shard]
                for pos in self.positions(seg).tolist():
                    index = shard.offset + pos
                    if seg.shard in broken:
                        yield index, None, -1, broken[seg.shard]
                        continue
                    try:
                        if stream is None or stream.shard is not shard or stream.position > pos:
                            if stream is not None:
                                stream.close()
                            stream = _ShardStream(shard, self.split, self.export_id, self.num_classes)
                            stream.open()
                        got = None
                        while stream.position <= pos:
                            try:
                                got = stream.next_sample(stream.position == pos)
                            except BadSample as err:
                                got = err
                            if got is None:
                                raise DataError(f"{stream.where()} ends after {stream.position} samples; "
                                                f"{META_FILE} lists {shard.stored}")  # fmt: skip
                        if isinstance(got, BadSample):
                            yield index, None, -1, str(got)
                            continue
                        assert got is not None
                        yield _sample_record(stream, got[0], got[1], index, int(self.shards.labels[index]))
                    except KdlabError as err:
                        broken[seg.shard] = str(err)
                        if stream is not None:
                            stream.close()
                            stream = None
                        yield index, None, -1, str(err)
        finally:
            if stream is not None:
                stream.close()


# ---------------------------------------------------------------------------------------------------------------------
# plans


@dataclass(frozen=True)
class WorkerPlan:
    """What one (virtual) worker delivers in a pass: its segments in reading order, the sizes of its batches, how
    many leading samples it drops (a resumed epoch), and its shuffle buffer (``None``: in order)."""

    segments: list[Segment]
    batches: list[int]
    skip: int = 0
    shuffle: int | None = None
    shuffle_seed: int = 0


@dataclass
class Sequence:
    """A pass's samples: shards in reading order with the kept positions of each (``None``: all of them)."""

    order: list[int]
    kept: dict[int, np.ndarray] | None
    cum: np.ndarray  # cumulative sample counts along ``order``

    @classmethod
    def build(cls, shards: SplitShards, order: list[int], keep: np.ndarray | None) -> Sequence:
        kept = None
        counts = []
        if keep is not None:
            kept = {}
            for i in order:
                s = shards.shards[i]
                lo, hi = np.searchsorted(keep, [s.offset, s.offset + s.count])
                kept[i] = keep[lo:hi] - s.offset
                counts.append(hi - lo)
        else:
            counts = [shards.shards[i].count for i in order]
        return cls(order, kept, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]))

    @property
    def total(self) -> int:
        return int(self.cum[-1])

    def segments(self, start: int, stop: int) -> list[Segment]:
        """The segments covering sequence positions ``[start, stop)``."""
        out = []
        k = int(np.searchsorted(self.cum, start, side="right")) - 1
        while start < stop and k < len(self.order):
            lo, hi = int(self.cum[k]), int(self.cum[k + 1])
            end = min(stop, hi)
            if end > start:
                out.append(Segment(self.order[k], start - lo, end - lo))
            start = max(start, end)
            k += 1
        return out


def _local_sizes(n: int, batch_size: int, shard: Callable[[torch.Tensor], torch.Tensor] | None) -> tuple[list[int], int]:
    """This rank's part of each global batch (sizes) and the number of samples of the lower ranks' parts. ``shard``
    maps a global batch to this rank's part, a contiguous slice in rank order (:func:`kdlab.engine.distributed.shard`)."""
    sizes, before = [], 0
    for start in range(0, n, batch_size):
        g = min(batch_size, n - start)
        if shard is None:
            sizes.append(g)
            continue
        part = shard(torch.arange(g))
        m = len(part)
        first = int(part[0]) if m else 0
        if m and not torch.equal(part.cpu(), torch.arange(first, first + m)):
            raise ConfigError("webdataset: each rank's part of a batch must be a contiguous slice")
        sizes.append(m)
        before += first
    return sizes, before


def rank_plan(seq: Sequence, batch_size: int, workers: int, *, start_batch: int = 0,
              shard: Callable[[torch.Tensor], torch.Tensor] | None = None, shuffle: int | None = None,
              seed_key: tuple[Any, ...] = (0,)) -> list[WorkerPlan]:  # fmt: skip
    """One plan per (virtual) worker of this rank for a training pass over ``seq``: the rank's contiguous range of the
    sequence, cut into one contiguous range per worker; worker ``w`` delivers steps ``w, w + W, …``."""
    sizes, start = _local_sizes(seq.total, batch_size, shard)
    w_count = max(1, workers)
    plans = []
    for w in range(w_count):
        mine = sizes[w::w_count]
        n = sum(mine)
        skipped = sum(sizes[t] for t in range(w, min(start_batch, len(sizes)), w_count))
        batches = [sizes[t] for t in range(w, len(sizes), w_count) if t >= start_batch]
        plans.append(WorkerPlan(seq.segments(start, start + n), batches, skipped, shuffle,
                                derive_seed(*seed_key, "shuffle-buffer", start)))  # fmt: skip
        start += n
    return plans


def eval_plan(seq: Sequence, batch_size: int, workers: int) -> list[WorkerPlan]:
    """Batches in sequence order, worker ``w`` delivering batches ``w, w + W, …`` (it reads past the others')."""
    w_count = max(1, workers)
    plans = []
    for w in range(w_count):
        segments, batches = [], []
        for start in range(w * batch_size, seq.total, w_count * batch_size):
            stop = min(start + batch_size, seq.total)
            segments += seq.segments(start, stop)
            batches.append(stop - start)
        plans.append(WorkerPlan(segments, batches))
    return plans


def _shuffled(records: Iterator[Record], size: int | None, seed: int) -> Iterator[Record]:
    """``records`` through a seeded shuffle buffer of ``size`` (``None``: unchanged)."""
    if not size or size <= 1:
        yield from records
        return
    import random

    rng = random.Random(seed)
    buf: list[Record] = []
    for rec in records:
        if len(buf) < size:
            buf.append(rec)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = rec
    rng.shuffle(buf)
    yield from buf


# ---------------------------------------------------------------------------------------------------------------------
# workers


@dataclass
class _Pass:
    """Everything a worker needs for one pass (inherited by the forked worker processes)."""

    reader: ShardReader
    plans: list[WorkerPlan]
    views: ImageViews
    view_set: tuple[View, ...]
    first_worker: int = 0  # the virtual worker DataLoader worker 0 plays (a resumed epoch starts mid-cycle)

    def batches(self, virtual: int) -> Iterator[tuple[Any, ...]]:
        plan = self.plans[virtual]
        stream = _shuffled(self.reader.records(plan.segments), plan.shuffle, plan.shuffle_seed)
        for _ in range(plan.skip):
            next(stream, None)  # samples of the steps before start_batch (a resumed epoch): read, never decoded
        for size in plan.batches:
            items: list[Item] = []
            for _ in range(size):
                rec = next(stream, None)
                if rec is None:
                    break
                items.append(self._item(rec))
            yield collate(items) if items else (None, None, None, [], None)

    def _item(self, rec: Record) -> Item:
        index, data, label, name = rec
        if data is None:
            return None, -1, index, name
        try:
            xs = tuple(self.views.load(data, index, view, name) for view in self.view_set)
        except BadSample as err:
            return None, -1, index, str(err)
        return xs, label, index, None


class _PassDataset(IterableDataset):
    def __init__(self, run: _Pass) -> None:
        self.run = run

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        return self.run.batches((self.run.first_worker + worker) % len(self.run.plans))


def _as_is(batch: Any) -> Any:
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# the data source


class ShardDataset(StreamBase):
    """A WebDataset export behind the :class:`~kdlab.data.base.DataSource` interface (see the module docstring)."""

    def __init__(self, name: str, export: Export, views: dict[str, ImageViews], *, shuffle_buffer: int = 1000,
                 **kwargs: Any) -> None:  # fmt: skip
        self.export = export
        self.splits = {split: export.splits[SPLITS[split]] for split in ("train", "test")}
        self.views = views
        self.shuffle_buffer = shuffle_buffer
        labels = {split: torch.from_numpy(s.labels) for split, s in self.splits.items()}
        super().__init__(name, export.num_classes, labels=labels, **kwargs)

    def split_size(self, split: str) -> int:
        return self.splits[check_split(split)].count

    @property
    def sample_keys(self) -> str:
        """Which samples the indices name, recorded and checked by teacher caches: the export's id."""
        return f"webdataset export {self.export.export_id}"

    def take_first(self, train: int | None, test: int | None) -> ShardDataset:
        """Keep only the first ``train`` / ``test`` samples of each split (``None``: all)."""
        for split, n in (("train", train), ("test", test)):
            if n is not None:
                self.splits[split] = self.splits[split].take_first(n)
                self._labels[split] = self._labels[split][:n]
        if self._train_y is not None and train is not None:
            self._train_y = self._train_y[:train]
        return self

    def _reader(self, split: str, keep: np.ndarray | None = None, order: list[int] | None = None) -> ShardReader:
        seq = self._sequence(split, keep, order)
        return ShardReader(SPLITS[split], self.splits[split], self.export.export_id, self.num_classes, seq.kept)

    def _sequence(self, split: str, keep: np.ndarray | None, order: list[int] | None = None) -> Sequence:
        shards = self.splits[split]
        return Sequence.build(shards, order if order is not None else list(range(len(shards.shards))), keep)

    def train_batches(
        self, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0, indices: torch.Tensor | None = None,
        shard: Callable[[torch.Tensor], torch.Tensor] | None = None, augment_seed: int | None = None,
        augment_epoch: int | None = None,
    ) -> Iterator[Batch]:  # fmt: skip
        """One epoch: shards in a seeded order, this rank's range through a seeded shuffle buffer per worker.
        ``indices`` in ascending order read those samples in order (a teacher cache); in any other order, the
        subset is read in the epoch's shuffled order."""
        view: View = ("train", seed if augment_seed is None else augment_seed,
                      epoch if augment_epoch is None else augment_epoch)  # fmt: skip
        keep, in_order = None, False
        if indices is not None:
            idx = indices.detach().cpu().long().numpy()
            in_order = bool(len(idx) < 2 or (np.diff(idx) > 0).all())
            keep = idx if in_order else np.unique(idx)
        shards = self.splits["train"].shards
        if in_order:
            order, shuffle = list(range(len(shards))), None
        else:
            order = torch.randperm(len(shards), generator=generator(seed, "shards", epoch)).tolist()
            shuffle = self.shuffle_buffer
        seq = self._sequence("train", keep, order)
        plans = rank_plan(seq, batch_size, self.workers, start_batch=start_batch, shard=shard, shuffle=shuffle,
                          seed_key=(seed, epoch))  # fmt: skip
        reader = ShardReader("train", self.splits["train"], self.export.export_id, self.num_classes, seq.kept)
        w = max(1, self.workers)
        return self._run("train", _Pass(reader, plans, self.views["train"], self._views(view), start_batch % w), view)

    def eval_batches(self, split: str, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Batches of ``split`` in order (or of the ascending ``indices`` of it), evaluation view."""
        keep = None
        if indices is not None:
            keep = indices.detach().cpu().long().numpy()
            if len(keep) > 1 and not (np.diff(keep) > 0).all():
                raise ConfigError("webdataset: evaluation reads shards in order; pass indices in ascending order")
        seq = self._sequence(split, keep)
        reader = ShardReader(SPLITS[split], self.splits[split], self.export.export_id, self.num_classes, seq.kept)
        return self._run(split, _Pass(reader, eval_plan(seq, batch_size, self.workers), self.views[split], (None,)),
                         None)  # fmt: skip

    def _run(self, split: str, run: _Pass, view: View) -> Iterator[Batch]:
        if self.workers == 0:
            return self._deliver(split, run.batches(0), view, release=False)
        loader = DataLoader(
            _PassDataset(run), batch_size=None, num_workers=self.workers, collate_fn=_as_is,
            pin_memory=self.device.type == "cuda", worker_init_fn=worker_init, prefetch_factor=self.prefetch,
            generator=torch.Generator().manual_seed(0),  # its seed draw must not advance the global torch RNG
        )  # fmt: skip
        return self._deliver(split, loader, view, release=True)

    def _first_samples(self, split: str, n: int) -> list[tuple[torch.Tensor, int]]:
        reader = self._reader(split)
        seq = self._sequence(split, None)
        out: list[tuple[torch.Tensor, int]] = []
        records = reader.records(seq.segments(0, seq.total))
        try:
            for rec in records:
                index, data, label, name = rec
                if data is not None:
                    try:
                        out.append((self.views[split].load(data, index, None, name), label))
                    except BadSample as err:
                        data, name = None, str(err)
                if data is None:
                    self._bad(split, [(index, name)])
                if len(out) == n:
                    break
        finally:
            records.close()  # type: ignore[attr-defined]
        if not out:
            raise DataError(f"{self.name}: no {split} sample could be loaded")
        return out


def load_webdataset(cfg: DataConfig) -> DataSource:
    """``data.name: webdataset``: the export at ``data.root`` / ``data.urls`` (see the module docstring)."""
    export = load_export(cfg)
    name = cfg.transform or export.transform or "imagenet"  # the export's own (cifar for CIFAR) unless set
    transform = build_image_transform(name, cfg.image_size, cfg.mean, cfg.std)
    norm = ImageAugment(transform.mean, transform.std, num_samples=0, enabled=False)
    views = {"train": build_image_views(cfg, transform, cfg.augment), "test": build_image_views(cfg, transform)}
    return ShardDataset(
        "webdataset", export, views, shuffle_buffer=cfg.shuffle_buffer, input_shape=(3, transform.size, transform.size),
        finish=norm.eval_batch, workers=cfg.workers, prefetch=cfg.prefetch, skip_bad=cfg.skip_bad_images,
    )  # fmt: skip


@DATASETS.register("webdataset")
def _build_webdataset(cfg: DataConfig) -> DataSource:
    return load_webdataset(cfg)

