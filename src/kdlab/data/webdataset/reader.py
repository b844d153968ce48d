"""Reading shards sequentially: members grouped into samples, checked against the export (header, labels, images),
damage named by shard and member."""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

from kdlab.data.decode import describe_error
from kdlab.data.stream import BadSample
from kdlab.data.webdataset.export import (
    _KEY,
    HEADER,
    IMAGE_SUFFIXES,
    META_FILE,
    Shard,
    SplitShards,
    _is_local,
    _local_path,
    _open_stream,
)
from kdlab.errors import DataError, KdlabError
from kdlab.fileio import check_file, max_bytes

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
