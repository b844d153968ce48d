"""Run-folder integrity (issue 13, points 1-5, 9, 11): code trust, one writer per folder, verified resumes, no silent
restart, --overwrite removing only kdlab's files, SIGTERM like SIGINT, files honouring the umask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from kdlab.cli import main
from kdlab.config import load_config
from kdlab.engine import Trainer, run
from kdlab.engine import checkpoint as ck
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.rundir import LOCK_FILES, FolderBusyError, FolderLock
from kdlab.errors import ConfigError, KdlabError
from kdlab.trust import UntrustedCodeError, import_object, require_trusted, set_trust, trusting

from conftest import CONFIGS, SMALL, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(*extra: str):
    return load_config(CONFIGS / "mnist1d" / "student_ce.yaml", SMALL + list(extra))


def _cli(capsys, *args) -> tuple[int, str]:
    """Run ``kdlab`` in-process; (exit code, stderr)."""
    set_trust(None)
    try:
        code = main([str(a) for a in args])
    finally:
        set_trust(None)
    return code, capsys.readouterr().err


def _one_line_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes (lock files aside: taking a lock records the holder's pid)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in LOCK_FILES}  # fmt: skip


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (copied by tests that change it)."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    run(_cfg(), out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# 1. code trust ---------------------------------------------------------------------------------------------------


def test_trust_policy_module_classes_pass_other_callables_need_trust():
    from torch import nn

    require_trusted("torch.nn:Linear", import_object("torch.nn:Linear", what="model.name"), what="model.name",
                    allowed=nn.Module)  # fmt: skip
    popen = import_object("subprocess:Popen", what="model.name")
    with pytest.raises(UntrustedCodeError, match=r"model.name 'subprocess:Popen'.*--trust-code.*KDLAB_TRUST_CODE"):
        require_trusted("subprocess:Popen", popen, what="model.name", allowed=nn.Module)
    with trusting():
        require_trusted("subprocess:Popen", popen, what="model.name", allowed=nn.Module)
    with pytest.raises(ConfigError, match="not something kdlab can call"):
        with trusting():
            require_trusted("os:sep", import_object("os:sep", what="data.name"), what="data.name")


def test_trust_from_environment_variable(monkeypatch):
    popen = import_object("subprocess:Popen", what="x")
    set_trust(None)
    monkeypatch.setenv("KDLAB_TRUST_CODE", "1")
    require_trusted("subprocess:Popen", popen, what="x")
    monkeypatch.setenv("KDLAB_TRUST_CODE", "0")
    with pytest.raises(UntrustedCodeError):
        require_trusted("subprocess:Popen", popen, what="x")


def test_a_run_folder_config_never_runs_popen(tmp_path, capsys, finished_run):
    """`model.name: subprocess:Popen` in a run's config.yaml: eval, --resume and analyze refuse before calling it."""
    out = _copy(finished_run, tmp_path / "run")
    marker = tmp_path / "MARKER"
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["model"] = {"name": "subprocess:Popen", "classifier": "fc", "kwargs": {"args": f"touch {marker}", "shell": True}}
    write_yaml(out / "config.yaml", raw)
    before = _snapshot(out)
    for args in (["eval", out], ["train", "--resume", "--out", out], ["analyze", out, "--no-teacher"]):
        code, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        assert "--trust-code" in _one_line_error(err) and "subprocess:Popen" in err
        assert not marker.exists(), args
    assert _snapshot(out) == before


def test_sweeps_and_study_specs_never_run_popen(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    popen = {"name": "subprocess:Popen", "classifier": "fc", "kwargs": {"args": f"touch {marker}", "shell": True}}
    recipe = write_yaml(tmp_path / "r.yaml", {"base": str(CONFIGS / "mnist1d" / "student_ce.yaml"), "model": popen})
    ce = str(CONFIGS / "mnist1d" / "student_ce.yaml")
    spec = write_yaml(tmp_path / "study.yaml", {"seeds": 1, "stages": [
        {"name": "s", "recipe": ce, "grid": {"m": {"p": {"model": popen}}}}, {"name": "t", "recipe": ce},
    ]})  # fmt: skip
    for args in (["sweep", recipe, "--grid", "optim.lr=0.1,0.2", "--out", tmp_path / "sw"],
                 ["chain", spec, "--out", tmp_path / "ch"], ["train", recipe, "--out", tmp_path / "t"]):  # fmt: skip
        code, err = _cli(capsys, *args)
        assert code == 2 and "--trust-code" in _one_line_error(err), (args, err)
        assert not marker.exists()


def test_a_factory_needs_trust_code_and_is_recorded(tmp_path, capsys):
    (tmp_path / "factory.py").write_text(
        "from torch import nn\n"
        "def make(num_classes=10):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(40, num_classes))\n"
    )
    recipe = write_yaml(tmp_path / "r.yaml", {
        "base": str(CONFIGS / "mnist1d" / "student_ce.yaml"),
        "model": {"name": f"{tmp_path / 'factory.py'}:make", "classifier": "1"},
    })  # fmt: skip
    small = [*SMALL, "train.epochs=1"]
    code, err = _cli(capsys, "train", recipe, *small, "--out", tmp_path / "a")
    assert code == 2 and "--trust-code" in _one_line_error(err) and not (tmp_path / "a").exists()
    code, _ = _cli(capsys, "train", recipe, *small, "--out", tmp_path / "a", "--trust-code")
    assert code == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["trusted_code"] == [f"{tmp_path / 'factory.py'}:make"]


# 2. one writer per run folder ------------------------------------------------------------------------------------


def test_a_second_writer_gets_one_line_and_nothing_changes(tmp_path, capsys, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    before = _snapshot(out)
    with FolderLock(out):
        code, err = _cli(capsys, "train", "--resume", "--out", out, "train.epochs=3")
        assert code == 2 and "is writing to" in _one_line_error(err) and f"pid {os.getpid()}" in err
        code, err = _cli(capsys, "analyze", out, "--no-teacher")
        assert code == 2 and "is writing to" in _one_line_error(err)
        with pytest.raises(FolderBusyError):
            FolderLock(out).acquire()
    assert _snapshot(out) == before


def test_a_failed_start_leaves_no_folder(tmp_path):
    target = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError):
        with FolderLock(target):
            raise RuntimeError("validation failed")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(KdlabError, match="not a folder"):
        FolderLock(tmp_path / "file").acquire()


# 3. resume verifies everything -----------------------------------------------------------------------------------


def test_hand_edited_config_yaml_is_refused_naming_the_key(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["optim"]["lr"] = 0.5
    write_yaml(out / "config.yaml", raw)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"config.yaml was edited after checkpoint epoch 2.*'optim.lr'"):
        Trainer(load_config(out / "config.yaml", ["train.epochs=3"]), out, resume=True).run()
    assert _snapshot(out) == before
    # a reformatted but equal config.yaml is fine
    raw["optim"]["lr"] = 0.05
    (out / "config.yaml").write_text("# a comment\n" + yaml.safe_dump(raw, sort_keys=True))
    assert Trainer(load_config(out / "config.yaml"), out, resume=True).run().summary["epochs"] == 2


def test_hand_edited_state_json_is_refused_naming_the_key(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    latest = ck.list_checkpoints(out / "checkpoints")[0]
    meta = json.loads((latest / "state.json").read_text())
    meta["best_acc"] = 99.0
    (latest / "state.json").write_text(json.dumps(meta))
    before = _snapshot(out)
    with pytest.raises(ck.EditedCheckpointError, match=r"state.json was edited by hand: 'best_acc'"):
        Trainer(_cfg(), out, resume=True).run()
    assert _snapshot(out) == before


def test_changing_the_teacher_weights_is_refused_on_resume(tmp_path, teacher_run):
    import shutil

    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_run / "model.safetensors", teacher)
    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml", SMALL + ["train.epochs=1", f"teacher.checkpoint={teacher}"])
    out = tmp_path / "kd"
    run(cfg, out)
    assert json.loads((ck.list_checkpoints(out / "checkpoints")[0] / "state.json").read_text())["teacher_sha256"]
    state = ck.load_weights_file(teacher)
    ck.save_weights(teacher, {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()})
    cfg.train.epochs = 2
    with pytest.raises(KdlabError, match="teacher's weights changed since the run started"):
        Trainer(cfg, out, resume=True).run()


def test_teacher_cache_is_checked_against_input_settings():
    from kdlab.config import DataConfig
    from kdlab.engine.resume import check_cache_inputs

    made = DataConfig(name="mnist1d", shift=0).model_dump(mode="json")
    check_cache_inputs(made, DataConfig(name="mnist1d", shift=0, workers=0, label_noise=0.1), "c.safetensors")
    with pytest.raises(ConfigError, match=r"data.shift=0 but this run has data.shift=3"):
        check_cache_inputs(made, DataConfig(name="mnist1d", shift=3), "c.safetensors")
    with pytest.raises(ConfigError, match=r"data.augment"):
        check_cache_inputs(made, DataConfig(name="mnist1d", augment=False), "c.safetensors")


def test_extending_epochs_updates_config_and_summary_shortening_is_refused(tmp_path, capsys, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    code, err = _cli(capsys, "train", "--resume", "--out", out, "train.epochs=1")
    assert code == 2 and "shortening a run is refused" in _one_line_error(err)
    code, _ = _cli(capsys, "train", "--resume", "--out", out, "train.epochs=3", "--quiet")
    assert code == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["epochs"] == 3
    assert json.loads((out / "summary.json").read_text())["epochs"] == 3
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    code, _ = _cli(capsys, "train", "--resume", "--out", out, "--quiet")  # config.yaml now says 3: nothing to do
    assert code == 0


# 4. no silent restart --------------------------------------------------------------------------------------------


def test_resume_without_usable_checkpoint_is_an_error_saying_what_was_found(tmp_path, capsys, finished_run):
    out = _copy(finished_run, tmp_path / "damaged")
    for c in ck.list_checkpoints(out / "checkpoints"):
        (c / "state.safetensors").write_bytes(b"garbage")
    before = _snapshot(out)
    code, err = _cli(capsys, "train", "--resume", "--out", out)
    line = _one_line_error(err)
    assert code == 2 and "no usable checkpoint" in line and "epoch_0002" in line and "epoch_0001" in line
    assert _snapshot(out) == before
    gone = _copy(finished_run, tmp_path / "deleted")
    import shutil

    shutil.rmtree(gone / "checkpoints")
    before = _snapshot(gone)
    code, err = _cli(capsys, "train", "--resume", "--out", gone)
    assert code == 2 and "2 finished epoch(s) in metrics.jsonl but no checkpoint" in _one_line_error(err)
    assert _snapshot(gone) == before


def test_temporaries_of_killed_writers_are_removed_at_the_next_start(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    (out / "checkpoints" / ".tmp-epoch_0003-99999").mkdir()
    (out / "checkpoints" / ".tmp-epoch_0003-99999" / "state.json").write_text("{")
    (out / ".metrics.jsonl.abc12345.tmp").write_text("half")  # mkstemp's pattern: eight random characters
    (out / "notes.txt").write_text("mine")
    (out / ".draft.tmp").write_text("mine too")  # a name of yours that merely ends in .tmp is not kdlab's
    Trainer(_cfg("train.epochs=3"), out, resume=True).run()
    assert not (out / "checkpoints" / ".tmp-epoch_0003-99999").exists()
    assert not (out / ".metrics.jsonl.abc12345.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / ".draft.tmp").read_text() == "mine too"


# 5. --overwrite removes only what kdlab wrote --------------------------------------------------------------------


def test_overwrite_keeps_the_users_files(tmp_path, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    run(_cfg("train.epochs=1"), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine").is_dir()
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_demo_overwrite_keeps_the_users_files(tmp_path, capsys, finished_run):
    from kdlab.demo import clear_demo

    out = tmp_path / "demo"
    out.mkdir()
    for name in ("demo.json", "results.md", "results.png", "notes.txt"):
        (out / name).write_text("x")
    _copy(finished_run, out / "teacher")
    _copy(finished_run, out / "students" / "student_kd_seed0")
    (out / "students" / "student_kd_seed0" / "mine.txt").write_text("mine")
    (out / "students" / "mine.txt").write_text("mine")
    clear_demo(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert left == ["notes.txt", "students", "students/mine.txt", "students/student_kd_seed0",
                    "students/student_kd_seed0/mine.txt"]  # fmt: skip
    import shutil

    shutil.rmtree(out / "students" / "student_kd_seed0")  # (a run folder holding a user's file is refused)
    (out / "demo.json").write_text("{}")
    _copy(finished_run, out / "teacher")
    small = ["--out", out, "--seeds", "1", "--teacher-epochs", "1", "--student-epochs", "1"]
    with FolderLock(out):
        code, err = _cli(capsys, "demo", *small)
    assert code == 2 and "is writing to" in _one_line_error(err)
    code, err = _cli(capsys, "demo", *small, "--overwrite")  # the real command: same rule
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "x" and (out / "students" / "mine.txt").is_file()
    assert (out / "results.md").read_text() != "x" and (out / "teacher" / "summary.json").is_file()


# 9. SIGTERM like SIGINT ------------------------------------------------------------------------------------------


def test_sigterm_one_message_exit_143_clean_and_resumable(tmp_path, capsys):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "kdlab", "train", CONFIGS / "mnist1d" / "student_ce.yaml", *SMALL,
            "train.epochs=1000", "--quiet", "--out", out]  # fmt: skip
    proc = subprocess.Popen([str(a) for a in args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not ck.list_checkpoints(out / "checkpoints") and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert ck.list_checkpoints(out / "checkpoints"), "no checkpoint within 120 s"
        # a second writer at the same time (here in-process, to save a start-up) gets one line
        code, second = _cli(capsys, *args[3:-2], "--out", out, "--resume")
        assert code == 2 and f"(pid {proc.pid}) is writing to" in _one_line_error(second)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143
    assert [x for x in err.splitlines() if x.strip()] == ["kdlab: terminated (SIGTERM)"]
    temps = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-")]
    assert temps == []
    from kdlab.engine.resume import load_resume_state

    state = load_resume_state(out, None)  # what --resume continues from (the full 1000 epochs are not run here)
    assert state is not None and state.meta["epoch"] >= 1
    rows = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[: state.meta["epoch"]] == list(range(1, state.meta["epoch"] + 1))


# 11. umask ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        ck.save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "w.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_run_results_are_readable_by_the_group(finished_run):
    for name in ("summary.json", "config.yaml", "metrics.jsonl", "model.safetensors"):
        mode = (finished_run / name).stat().st_mode & 0o777
        assert mode == 0o666 & ~_umask(), (name, oct(mode))


def _umask() -> int:
    from kdlab.engine.atomic import current_umask

    return current_umask()


# real filesystem: a read-only run folder ---------------------------------------------------------------------------


def test_resume_on_a_read_only_mount_is_one_line_and_changes_nothing(tmp_path, capsys, finished_run):
    out = _copy(finished_run, tmp_path / "run")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(out), str(ro)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount read-only here: {mounted.stderr.decode().strip()}")
    try:
        if os.access(ro, os.W_OK) and subprocess.run(["touch", str(ro / "probe")]).returncode == 0:
            pytest.skip("the read-only bind mount is writable here")
        before = _snapshot(out)
        code, err = _cli(capsys, "train", "--resume", "--out", ro, "train.epochs=3")
        assert code == 2 and "Read-only file system" in _one_line_error(err)
        assert _snapshot(out) == before
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)
