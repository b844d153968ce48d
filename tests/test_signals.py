"""A signal never costs the run (issue 19 §5): real SIGTERM / SIGINT / SIGKILL sent to real ``kdlab`` processes at
chosen moments — during the first epoch, inside the first checkpoint write (later moments:
``test_run_integrity.py``), inside a teacher-cache write — and what each leaves behind.

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
    for _ in range(6000):  # the test's signal arrives here; short sleeps, as a training loop returns to Python often:
        time.sleep(0.1)  # a signal the kernel hands to another thread is run by the main thread at its next bytecode


if moment in ("first epoch", "second epoch"):  # config.yaml written, epoch 1 (or 2: epoch 1's checkpoint kept) training
    import kdlab.engine.trainer as tr
    real_epoch = tr.Trainer.train_epoch
    def train_epoch(self, epoch):
        if epoch == (1 if moment == "first epoch" else 2):
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

if sys.argv[1:2] == ["--worker"]:  # what a launcher starts: python -m kdlab.pipelines.worker JOB.json
    from kdlab.pipelines.worker import main
    sys.exit(main(sys.argv[2:]))
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
        ("first epoch", signal.SIGINT, 130, "kdlab: interrupted"),
        ("first checkpoint", signal.SIGTERM, 143, "kdlab: terminated (SIGTERM)"),
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


def test_a_time_limit_s_two_stop_signals_stop_the_worker_once(tmp_path, reference):
    """A Slurm time limit sends the worker two stop signals within milliseconds: the scheduler's SIGUSR2 (to every
    process of the job step) and the launcher's SIGTERM. The first stops the run resumably; the second is absorbed:
    on the old main it either killed the worker in its cleanup (exit -15) or printed CPython's "Signal 15 ignored due
    to race condition" traceback. The same job file then resumes after epoch 1 and ends as an uninterrupted run."""
    from kdlab.config import load_config
    from kdlab.pipelines.runner import write_job

    out, job = tmp_path / "run", tmp_path / "job.json"
    write_job(job, load_config(CE, SMALL), out, None, "run")
    proc, _ = _start(tmp_path, "second epoch", "--worker", job)
    os.kill(proc.pid, signal.SIGUSR2)
    assert _stop(proc, signal.SIGTERM) == (143, ["kdlab: terminated (stopped resumably; the last epoch checkpoint is "
                                                 "kept)"])  # fmt: skip
    assert _epochs(out) == [1] and _temps(out) == []
    again = subprocess.run([sys.executable, "-m", "kdlab.pipelines.worker", str(job)], capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0 and f"resuming {out}" in again.stdout, again.stderr[-2000:]
    assert _epochs(out) == [1, 2] and _same_weights(out, reference)


def _cache_args(teacher_run: Path, out: Path) -> list[object]:
    return ["cache-teacher", KD, f"teacher.checkpoint={teacher_run}", *SMALL, "--views", "2", "--out", out]


def test_cache_teacher_temporaries_live_and_stale(tmp_path, teacher_run, capsys):
    """Two cache-teacher processes writing one file: the second leaves the first's temporary alone (it is alive);
    the first then killed outright (SIGKILL: no cleanup) leaves it behind, and the next run removes it (today's main
    left it forever). A file of yours of another pattern stays."""
    from kdlab.cli import main
    from kdlab.engine.teacher_cache import TeacherCache

    out = tmp_path / "c.safetensors"
    (tmp_path / ".c.safetensors.mine.tmp").write_text("a file of yours")
    first, _ = _start(tmp_path, "cache write", *_cache_args(teacher_run, out))
    (live,) = [p for p in tmp_path.glob(".c.safetensors.*.tmp") if p.name != ".c.safetensors.mine.tmp"]
    assert main(_cache_args(teacher_run, out)) == 0 and live.exists()  # still being written by the first
    assert _stop(first, signal.SIGKILL)[0] == -signal.SIGKILL and live.exists()  # now stale
    assert main([*_cache_args(teacher_run, out), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.glob(".c.safetensors.*")) == [".c.safetensors.mine.tmp"]
    assert TeacherCache(out).info.views == 2


def test_temporaries_are_removed_only_when_no_live_writer_holds_them(tmp_path, monkeypatch):
    """The rules of kdlab.engine.atomic: a locked temporary stays, an unlocked one of the target's exact pattern
    goes, a link or another name never does, and a writer whose fresh temporary a cleaner took starts a new one."""
    import tempfile

    from kdlab.engine import atomic

    target = tmp_path / "c.safetensors"
    fd, live = atomic.new_temp(target)
    (tmp_path / ".c.safetensors.zz.tmp").write_text("not mkstemp's pattern")
    (tmp_path / ".c.safetensors.abcdefgh.tmp").symlink_to(tmp_path / "elsewhere")
    (tmp_path / ".other.safetensors.abcdefgh.tmp").write_text("another target's")
    assert atomic.remove_stale_temps_of(target) == [] and Path(live).exists()
    os.close(fd)  # the writer died: its lock went with it
    assert atomic.remove_stale_temps_of(target) == [Path(live)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".c.safetensors.abcdefgh.tmp", ".c.safetensors.zz.tmp", ".other.safetensors.abcdefgh.tmp"]

    real, taken = tempfile.mkstemp, []

    def mkstemp(*a, **k):  # a cleaner runs in the instant between creating and locking the first one
        fd, name = real(*a, **k)
        if not taken:
            taken.append(name)
            assert atomic.remove_if_dead(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    fd, name = atomic.new_temp(target)
    assert name != taken[0] and Path(name).exists() and not Path(taken[0]).exists()
    os.close(fd)
