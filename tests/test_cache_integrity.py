"""Teacher caches are checked byte for byte (issue 19 §7): a SHA-256 per chunk of every tensor and of the header,
verified as each view is loaded for replay; damage anywhere is one line naming the file, exit code 2."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from conftest import CONFIGS, SMALL

KD = CONFIGS / "mnist1d" / "student_kd.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, teacher_run: Path) -> Path:
    from kdlab.cli import main

    out = tmp_path_factory.mktemp("cache") / "c.safetensors"
    assert main(["cache-teacher", KD, f"teacher.checkpoint={teacher_run}", *SMALL, "--views", "2", "--out", out]) == 0
    return out


def _header_size(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def _damaged(cache: Path, tmp_path: Path, at: int, xor: int = 1) -> Path:
    copy = tmp_path / "damaged.safetensors"
    data = bytearray(cache.read_bytes())
    data[at] ^= xor
    copy.write_bytes(bytes(data))
    return copy


def _distill(teacher_run: Path, cache: Path, out: Path, capsys) -> tuple[int, list[str]]:
    from kdlab.cli import main

    capsys.readouterr()
    code = main(["distill", KD, f"teacher.checkpoint={teacher_run}", f"teacher.cache={cache}", *SMALL, "--quiet",
                 "--out", out])  # fmt: skip
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


def test_an_intact_cache_replays(cache, teacher_run, tmp_path, capsys):
    code, err = _distill(teacher_run, cache, tmp_path / "run", capsys)
    assert (code, err) == (0, [])


@pytest.mark.parametrize(("where", "epochs_done"), [("first logit", 0), ("last byte of view 2", 1)])
def test_one_changed_logit_byte_is_one_line_exit_2(cache, teacher_run, tmp_path, capsys, where, epochs_done):
    """A byte of view 1 stops the run at epoch 1, one of view 2 at epoch 2: each view is verified as it is loaded
    (no separate pass over the file), and the checkpoints written before stay for ``--resume`` once rebuilt."""
    at = _header_size(cache) if where == "first logit" else cache.stat().st_size - 1
    bad = _damaged(cache, tmp_path, at)
    code, err = _distill(teacher_run, bad, tmp_path / "run", capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"kdlab: error: teacher cache {bad} is damaged: bytes ") and "logits." in err[0]
    assert "rebuild it with kdlab cache-teacher" in err[0]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if epochs_done else []
    assert len(rows) == epochs_done


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("a tensor name", "its header does not match its recorded SHA-256"),
        ("a shape digit", "its header does not match its recorded SHA-256"),
        ("the metadata's JSON", "damaged header (its metadata does not parse)"),
        ("the header length", "no safetensors header"),
    ],
)
def test_a_damaged_header_is_one_line_exit_2(cache, teacher_run, tmp_path, capsys, where, message):
    raw = cache.read_bytes()
    at = {
        "a tensor name": raw.index(b'"logits.0"') + 2,
        "a shape digit": raw.index(b'"shape":[') + len(b'"shape":['),
        "the metadata's JSON": raw.index(b'"kdlab":"{') + len(b'"kdlab":"{') + 1,
        "the header length": 7,
    }[where]
    bad = _damaged(cache, tmp_path, at, xor=1 if where == "a shape digit" else 4)  # '8' -> '9': still JSON
    code, err = _distill(teacher_run, bad, tmp_path / "run", capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0] and message in err[0], err
    assert not (tmp_path / "run").exists()  # refused before the run folder is touched


def test_a_cache_without_checksums_is_refused_with_a_rebuild_message(cache, teacher_run, tmp_path, capsys):
    """Caches of the previous format (v1, no checksums) cannot be verified: refused, naming the fix."""
    from safetensors.torch import load_file, save_file

    old = tmp_path / "v1.safetensors"
    meta = json.loads(__import__("safetensors").safe_open(str(cache), "pt").metadata()["kdlab"])
    save_file(load_file(cache), str(old), metadata={"kdlab": json.dumps(dict(meta, format="kdlab-teacher-cache-v1"))})
    code, err = _distill(teacher_run, old, tmp_path / "run", capsys)
    assert code == 2 and err == [f"kdlab: error: teacher cache {old} was made by an older kdlab without checksums; "
                                 "rebuild it with kdlab cache-teacher (same arguments)"]  # fmt: skip


def test_each_chunk_is_named(tmp_path, monkeypatch):
    """With 1 KiB chunks, a changed byte is reported in its own chunk's byte range of its tensor."""
    import torch

    from kdlab.engine import teacher_cache as tc
    from kdlab.errors import CheckpointError

    monkeypatch.setattr(tc, "CHUNK_BYTES", 1024)
    path = tmp_path / "c.safetensors"
    meta = dict(format=tc.FORMAT, views=1, num_samples=100, num_classes=10, augment_seed=0, fields=["logits"],
                dataset="synthetic")  # fmt: skip
    writer = tc.CacheWriter(path, meta)
    logits = torch.randn(100, 10)  # 4000 bytes: four chunks
    writer.start([("logits.0", torch.float32, (100, 10))])
    writer.write(logits)
    writer.finish()
    assert torch.equal(tc.TeacherCache(path).outputs(1, torch.arange(100)).logits, logits)
    shutil.copy(path, tmp_path / "good.safetensors")
    data = bytearray(path.read_bytes())
    data[_header_size(path) + 2500] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bytes 2048-3072 of tensor 'logits.0' do not match"):
        tc.TeacherCache(path).outputs(1, torch.arange(100))
