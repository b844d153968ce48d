"""An export's description (``dataset.json``) and where its shards are: ``data.root`` or ``data.urls`` (lists, brace
patterns, ``file:``, ``http(s)://``, ``pipe:`` commands), checked before any shard is read."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from kdlab.data.decode import describe_error
from kdlab.data.images import IMAGE_EXTENSIONS
from kdlab.errors import ConfigError, DataError, KdlabError
from kdlab.fileio import check_file, max_bytes

if TYPE_CHECKING:
    from kdlab.config import DataConfig

FORMAT = "kdlab-webdataset-v1"
META_FILE = "dataset.json"
HEADER = "__kdlab__"
SPLITS = {"train": "train", "test": "val"}  # kdlab split -> the export's split (shard prefix, dataset.json key)
IMAGE_SUFFIXES = tuple(e[1:] for e in IMAGE_EXTENSIONS)
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key / suffix split: key up to the first dot


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
    from kdlab.trust import allow_shell

    for command in dict.fromkeys(u for u in urls if u.startswith("pipe:")):
        allow_shell("data.urls", command)


def _open_stream(url: str) -> IO[bytes]:
    """A remote shard or ``pipe:`` command opened by the webdataset package (``pipe:`` only under --trust-code)."""
    _check_commands([url])
    from webdataset.gopen import (
        gopen,  # (the package's top-level `gopen` is the function, not this module)
    )

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
