"""kdlab.fileio, the one bounded reader (issue 19 §2): regular files only (a FIFO never blocks, a device is never
read), a size limit per kind adjustable with ``KDLAB_MAX_BYTES_<KIND>``, never more than the limit even from a file
that grows while it is read; the limits table in docs/run_folders.md is the code's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdlab import fileio
from kdlab.errors import KdlabError

REPO = Path(__file__).resolve().parents[1]


def _readers(path: Path) -> dict[str, object]:
    return {
        "check_file": lambda: fileio.check_file(path, "json"),
        "read_bytes": lambda: fileio.read_bytes(path, "json"),
        "read_text": lambda: fileio.read_text(path, "json"),
        "read_json": lambda: fileio.read_json(path),
        "open_binary": lambda: fileio.open_binary(path, "json").read(),
        "sha256": lambda: fileio.sha256(path, "json"),
        "read_tail": lambda: fileio.read_tail(path, "json"),
    }


@pytest.mark.parametrize("reader", list(_readers(Path())))
@pytest.mark.parametrize(
    ("make", "said"),
    [
        (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
        (lambda p: os.symlink("/dev/zero", p), "is a device, not a regular file"),
        (lambda p: p.mkdir(), "is a folder, not a regular file"),
        (lambda p: None, "json file not found: "),
    ],
    ids=["fifo", "dev-zero link", "folder", "missing"],
)
def test_only_regular_files_are_read(tmp_path, no_hang, reader, make, said):
    path = tmp_path / "summary.json"
    make(path)
    with pytest.raises(KdlabError, match=said.replace("(", r"\(").replace(")", r"\)")) as info:
        _readers(path)[reader]()
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_symlink_to_a_regular_file_is_followed(tmp_path):
    (tmp_path / "real.json").write_text('{"a": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    assert fileio.read_json(tmp_path / "link.json") == {"a": 1}


def test_the_limit_per_kind_and_its_variable(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"x" * 2048)
    monkeypatch.setenv("KDLAB_MAX_BYTES_METRICS", "1K")
    with pytest.raises(KdlabError) as info:
        fileio.read_text(path, "metrics", "metrics file")
    assert str(info.value) == (f"metrics file {path} is 2.0 KiB, over the 1.0 KiB limit for metrics files "
                               "(raise it with KDLAB_MAX_BYTES_METRICS=SIZE)")  # fmt: skip
    monkeypatch.setenv("KDLAB_MAX_BYTES_METRICS", "2K")
    assert len(fileio.read_text(path, "metrics")) == 2048  # exactly at the limit: read
    assert fileio.max_bytes("json") == fileio.LIMITS["json"].default  # the other kinds keep theirs
    monkeypatch.setenv("KDLAB_MAX_BYTES_METRICS", "lots")
    with pytest.raises(KdlabError, match="KDLAB_MAX_BYTES_METRICS must be a size such as 512M or 4G, got 'lots'"):
        fileio.read_text(path, "metrics")


def test_a_file_growing_while_read_is_cut_at_the_limit(tmp_path, monkeypatch):
    """Checked at 1 KiB, then grown to 3 KiB before the read: the reader stops at the limit, it does not follow."""
    monkeypatch.setenv("KDLAB_MAX_BYTES_ARCHIVE", "2K")
    path = tmp_path / "a.npz"
    path.write_bytes(b"x" * 1024)
    f = fileio.open_binary(path, "archive", "data file")
    with open(path, "ab") as grow:
        grow.write(b"y" * 2048)
    with pytest.raises(KdlabError, match="grew past the 2.0 KiB limit for archive files while being read"):
        f.read()
    f.close()


def test_read_bytes_reads_what_fstat_gave_in_one_buffer(tmp_path):
    """A 64 GiB limit must not make a 64 GiB buffer (the first version did: MemoryError on every checkpoint)."""
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"z" * 100_000)
    assert fileio.read_bytes(path, "checkpoint") == b"z" * 100_000


def test_the_documented_limits_are_the_codes():
    doc = (REPO / "docs" / "run_folders.md").read_text()
    assert fileio.limits_table() in doc
