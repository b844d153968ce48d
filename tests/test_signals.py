"""A signal never costs the run (issue 19 §5): real SIGTERM / SIGINT / SIGKILL sent to real ``kdlab`` processes at
chosen moments — before anything is written, during the first epoch, inside the first checkpoint write (later
moments: ``test_run_integrity.py``), inside a teacher-cache write — and what each leaves behind.

A moment is reached by a small driver that wraps one kdlab function to stop there (it writes a marker file, then
sleeps); the test waits for the marker and sends the signal, so the signal lands exactly at that moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CONFIGS, SMALL

CE = CONFIGS / "mnist1d" / "student_ce.yaml"
KD = CONFIGS / "mnist1d" / "student_kd.yaml"

DRIVER = r"""
import os, sys, time
from pathlib import Path

moment, marker = os.environ["KDLAB_TEST_MOMENT"], Path(os.environ["KDLAB_TEST_MARKER"])


def pause():
    marker.write_text(str(os.getpid()))
    time.sleep(600)  # the test's signal arrives here


if moment == "startup":  # validation, before the run folder exists
    import kdlab.engine.trainer as tr
    real_check = tr.check_model_fits_data
    def check(*a, **k):
        pause()
        return real_check(*a, **k)
    tr.check_model_fits_data = check
elif moment == "first epoch":  # config.yaml written, epoch 1 training
    import kdlab.engine.trainer as tr
    real_epoch = tr.Trainer.train_epoch
    def train_epoch(self, epoch):
        if epoch == 1:
            pause()
        return real_epoch(self, epoch)
    tr.Trainer.train_epoch = train_epoch
elif moment == "first checkpoint":  # both files written into the checkpoint's temporary folder, not renamed
    import kdlab.engine.checkpoint as ck
    real_write = ck.atomic_write_text
    def write(path, text, *a, **k):
        out = real_write(path, text, *a, **k)
        if Path(path).name == "state.json" and "epoch_0001" in Path(path).parent.name:
            pause()
        return out
    ck.atomic_write_text = write
elif moment == "cache write":  # the cache's header and first tensor are in its temporary file
    import kdlab.engine.teacher_cache as tc
    real_tensor = tc.CacheWriter.write
    def write_tensor(self, t):
        real_tensor(self, t)
        pause()
    tc.CacheWriter.write = write_tensor

from kdlab.cli import entry

sys.argv = ["kdlab", *sys.argv[1:]]
entry()
"""


def _start(tmp_path: Path, moment: str, *args: object) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / f"paused-{moment.replace(' ', '-')}-{time.monotonic_ns()}"
    env = dict(os.environ, KDLAB_TEST_MOMENT=moment, KDLAB_TEST_MARKER=str(marker), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"kdlab ended before reaching '{moment}': {proc.communicate()}")
        assert time.monotonic() < deadline, f"'{moment}' not reached"
        time.sleep(0.05)
    return proc, marker


def _stop(proc: subprocess.Popen, sig: int) -> tuple[int, list[str]]:
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=120)
    return proc.returncode, [ln for ln in err.splitlines() if ln.strip()]


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name)


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run, never interrupted: what every resumed run must end with."""
    from kdlab.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", CE, "--out", out, "--quiet", *SMALL]) == 0
    return out


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(bool((wa[k] == wb[k]).all()) for k in wa)


@pytest.mark.parametrize(
    ("moment", "sig", "code", "line"),
    [
        ("first epoch", signal.SIGTERM, 143, "kdlab: terminated (SIGTERM)"),
        ("first checkpoint", signal.SIGTERM, 143, "kdlab: terminated (SIGTERM)"),
        ("first checkpoint", signal.SIGINT, 130, "kdlab: interrupted"),
    ],
)
def test_a_signal_before_the_first_checkpoint_keeps_the_run(tmp_path, reference, capsys, moment, sig, code, line):
    """Before the first checkpoint: the folder keeps its config.yaml (today's main removed the whole run), and
    ``--resume`` alone starts it at epoch 1 with the recorded config, ending as an uninterrupted run."""
    from kdlab.cli import main

    out = tmp_path / "run"
    proc, _ = _start(tmp_path, moment, "train", CE, "--out", out, "--quiet", *SMALL)
    assert _stop(proc, sig) == (code, [line])
    assert (out / "config.yaml").is_file() and _temps(out) == []  # nothing half-written, nothing of the run lost
    assert not (out / "checkpoints").is_dir() or not any((out / "checkpoints").iterdir())
    assert main(["train", "--resume", "--out", out]) == 0  # the recorded config alone
    assert f"no epoch of {out} had finished; starting it from epoch 1" in capsys.readouterr().err
    assert _epochs(out) == [1, 2] and _same_weights(out, reference)


def test_a_signal_before_anything_is_written_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    proc, _ = _start(tmp_path, "startup", "train", CE, "--out", out, "--quiet", *SMALL)
    assert _stop(proc, signal.SIGTERM) == (143, ["kdlab: terminated (SIGTERM)"])
    assert not out.exists()  # as before the command: a plain start (or `--resume` saying so) is next


def _cache_args(teacher_run: Path, out: Path) -> list[object]:
    return ["cache-teacher", KD, f"teacher.checkpoint={teacher_run}", *SMALL, "--views", "2", "--out", out]


def test_a_killed_cache_teacher_leaves_a_temporary_the_next_run_removes(tmp_path, teacher_run, capsys):
    from kdlab.cli import main
    from kdlab.engine.teacher_cache import TeacherCache

    out = tmp_path / "c.safetensors"
    (tmp_path / ".c.safetensors.mine.tmp").write_text("a file of yours")  # not kdlab's pattern: kept
    proc, _ = _start(tmp_path, "cache write", *_cache_args(teacher_run, out))
    assert _stop(proc, signal.SIGKILL)[0] == -signal.SIGKILL  # no cleanup at all
    stale = [p.name for p in tmp_path.glob(".c.safetensors.*.tmp") if p.name != ".c.safetensors.mine.tmp"]
    assert len(stale) == 1 and not out.exists()
    assert main(_cache_args(teacher_run, out)) == 0
    assert sorted(p.name for p in tmp_path.glob(".c.safetensors.*")) == [".c.safetensors.mine.tmp"]
    assert TeacherCache(out).info.views == 2


def test_a_live_writers_temporary_is_never_removed(tmp_path, teacher_run, capsys):
    """Two cache-teacher processes writing the same file: the second one leaves the first one's temporary alone;
    the first, stopped by SIGTERM, removes its own; the second's cache stays."""
    from kdlab.cli import main
    from kdlab.engine.teacher_cache import TeacherCache

    out = tmp_path / "c.safetensors"
    first, _ = _start(tmp_path, "cache write", *_cache_args(teacher_run, out))
    (live,) = tmp_path.glob(".c.safetensors.*.tmp")
    assert main(_cache_args(teacher_run, out)) == 0
    assert live.exists()  # still being written by the first process
    assert _stop(first, signal.SIGTERM) == (143, ["kdlab: terminated (SIGTERM)"])
    assert not live.exists() and TeacherCache(out).info.views == 2
