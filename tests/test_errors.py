"""Issue 13 §6–8: every failure is one line (exit 2 for input/environment, 1 + --debug hint for bugs), bad data and
weights are refused before training naming the file, messages tell the truth. Real filesystem failures are real:
a read-only bind mount and a full tmpfs (skipped where mounting is not permitted)."""

import argparse
import json
import os
import subprocess
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest

from kdlab.cli import COMMANDS, build_parser, main, nonnegative_int, positive_int
from kdlab.config import expand_path
from kdlab.errors import ConfigError, DataError

from conftest import CONFIGS, SMALL, run_kdlab

CE = CONFIGS / "mnist1d" / "student_ce.yaml"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: error: ") and "Traceback" not in err[0], err
    return err[0]


# --------------------------------------------------------------------------------------------------------------------
# every subcommand: no arguments, bad paths, bad numbers


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _int_option(action: argparse.Action) -> bool:
    return action.type in (int, positive_int, nonnegative_int)


def _bad_invocations(name: str, sub: argparse.ArgumentParser, missing: Path) -> list[list[str]]:
    """No arguments (when some are required), every path a missing one, every number negative / not a number."""
    positionals = [a for a in sub._actions if not a.option_strings and a.nargs != "*"]
    required = [a for a in sub._actions if a.option_strings and a.required]

    def fill(number: str = "1") -> list[str]:
        args = [str(missing / f"p{i}") for i, _ in enumerate(positionals)]
        for a in required:
            args += [a.option_strings[0], number if _int_option(a) else str(missing / a.dest)]
        return args

    calls = [[name]] if any(a.nargs != "?" for a in positionals) or required else []
    if positionals:
        calls.append([name, *fill()])
    for a in sub._actions:
        if a.option_strings and _int_option(a):
            calls += [[name, *fill(), a.option_strings[0], "-3"], [name, *fill(), a.option_strings[0], "three"]]
    return calls


def test_every_subcommand_fails_in_one_line_without_traceback(tmp_path, capsys):
    missing = tmp_path / "missing"
    subs = _subparsers()
    assert set(subs) == set(COMMANDS) and len(subs) >= 13  # `kdlab --help` lists exactly the registry
    tried = 0
    for name, sub in subs.items():
        for argv in _bad_invocations(name, sub, missing):
            capsys.readouterr()
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 2, (argv, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kdlab: error: "), (argv, err)
            assert "Traceback" not in err
            tried += 1
    assert tried >= 40 and not missing.exists()  # nothing was created on the way


def test_console_script_no_traceback_and_debug(tmp_path):
    res = run_kdlab("eval", tmp_path / "none.safetensors")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    res = run_kdlab("train", CE, "--out", tmp_path / "r", "model.name=nope", "--debug")
    assert res.returncode == 2 and "Traceback" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("kdlab: error: unknown model 'nope'")


def test_usage_errors_are_one_line(capsys):
    assert main(["train"]) == 2
    assert _one_line(capsys) == (
        "kdlab: error: kdlab train: the following arguments are required: --out (see `kdlab train --help`)"
    )


def test_internal_error_exit_1_with_debug_hint(monkeypatch, capsys):
    def boom(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(COMMANDS.get("keys"), "handler", boom)
    assert main(["keys"]) == 1
    assert _one_line(capsys) == (
        "kdlab: error: internal error (ZeroDivisionError: division by zero second line); "
        "rerun with --debug for the traceback"
    )
    assert main(["keys", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1] == "kdlab: error: internal error (ZeroDivisionError: division by zero second line)"


@pytest.mark.parametrize(
    "exc, message",
    [
        (PermissionError(13, "Permission denied", "/data/x"), "Permission denied: /data/x"),
        (OSError(28, "No space left on device"), "No space left on device"),
        (IsADirectoryError(21, "Is a directory", "/a", None, "/b"), "Is a directory: /a -> /b"),
    ],
)
def test_os_errors_are_one_line_exit_2(exc, message, monkeypatch, capsys):
    def fail(args):
        raise exc

    monkeypatch.setattr(COMMANDS.get("keys"), "handler", fail)
    assert main(["keys"]) == 2
    assert _one_line(capsys) == f"kdlab: error: {message}"


# --------------------------------------------------------------------------------------------------------------------
# real filesystems: read-only and full


@pytest.fixture
def mount(tmp_path):
    """``mount(kind, size_kib)`` → a fresh mount point: "tmpfs" of that size, or "ro" (a read-only bind mount)."""
    points = []

    def make(kind: str, size_kib: int = 1024) -> Path:
        point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        if kind == "tmpfs":
            cmds = [["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(point)]]
        else:
            cmds = [["mount", "--bind", str(tmp_path), str(point)], ["mount", "-o", "remount,bind,ro", str(point)]]
        for i, cmd in enumerate(cmds):
            try:
                ok = subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0
            except OSError:
                ok = False
            if not ok:
                if i:
                    subprocess.run(["umount", str(point)], capture_output=True)
                pytest.skip(f"cannot mount here ({' '.join(cmd[:3])})")
        points.append(point)
        return point

    yield make
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", str(CE), *SMALL, "train.epochs=1", "--quiet", "--out", str(out), *extra]


def test_read_only_out_is_one_line(mount, capsys):
    ro = mount("ro")
    assert main(_train(ro / "run")) == 2
    assert "Read-only file system" in _one_line(capsys) and not (ro / "run").exists()


def test_disk_full_at_first_write_leaves_nothing_and_retry_runs(mount, capsys):
    disk = mount("tmpfs", 1024)
    filler = disk / "filler"
    with open(filler, "wb") as f:  # leave ~40 KiB: the lock and config.yaml fit, the first weights file does not
        f.write(b"\0" * (1024 - 40) * 1024)
    out = disk / "run"
    assert main(_train(out)) == 2
    assert "No space left on device" in _one_line(capsys)
    assert not out.exists()  # no half run folder ...
    filler.unlink()
    assert main(_train(out)) == 0  # ... that would block the same command
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


def test_disk_full_before_anything_is_one_line(mount, capsys):
    disk = mount("tmpfs", 64)
    with open(disk / "filler", "wb") as f:
        with pytest.raises(OSError):
            f.write(b"\0" * 128 * 1024)
            f.flush()
    assert main(_train(disk / "run")) == 2
    assert _one_line(capsys) == f"kdlab: error: cannot write in {disk / 'run'}: No space left on device"
    assert not (disk / "run").exists()


# --------------------------------------------------------------------------------------------------------------------
# data archives, paths, truthful messages


def test_archive_members_over_the_limit_are_refused_before_reading(tmp_path, monkeypatch):
    from kdlab.data import cifar

    np.savez(tmp_path / "train.npz", images=np.zeros((4, 32, 32, 3), np.uint8), fine_labels=np.arange(4))
    np.savez(tmp_path / "test.npz", images=np.zeros((4, 32, 32, 3), np.uint8), fine_labels=np.arange(4))
    src = tmp_path / "cifar-100-python"
    src.mkdir()
    for name in ("train", "test"):
        (src / name).write_bytes(b"x" * 5000)
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-100-python")
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 4000)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a: pytest.fail("member read before its size check"))
    with pytest.raises(DataError, match=r"c\.tar\.gz: member 'cifar-100-python/train' is 5000 bytes, over the 4000"):
        cifar.read_cifar(tmp_path / "c.tar.gz", cifar.CIFAR100)
    with pytest.raises(DataError, match=r"train\.npz: member 'images.npy' is \d+ bytes, over the 4000 byte limit"):
        cifar.read_cifar(tmp_path, cifar.CIFAR100)
    with pytest.raises(DataError, match=r"cifar-100-python/train is 5000 bytes, over the 4000 byte limit"):
        cifar.read_cifar(src, cifar.CIFAR100)


def test_expand_path_names_unset_variables(monkeypatch):
    monkeypatch.setenv("KDLAB_T_SET", "/data")
    monkeypatch.delenv("KDLAB_T_UNSET", raising=False)
    assert expand_path("${KDLAB_T_SET}/c") == "/data/c" and expand_path("$KDLAB_T_SET/c") == "/data/c"
    assert expand_path("${KDLAB_T_UNSET:-/tmp}/c") == "/tmp/c" and expand_path("${KDLAB_T_UNSET:-}c") == "c"
    assert expand_path("~/x") == os.path.expanduser("~/x")
    for text in ("${KDLAB_T_UNSET}/c", "$KDLAB_T_UNSET/c"):
        with pytest.raises(ConfigError, match="environment variable KDLAB_T_UNSET is not set"):
            expand_path(text)


def test_non_finite_message_mentions_a_checkpoint_only_when_one_exists(tmp_path):
    import torch

    from kdlab.engine.trainer import NonFiniteLossError, Trainer

    trainer = Trainer.__new__(Trainer)  # only the run folder matters for the message
    trainer.out = tmp_path
    terms = {"ce": torch.tensor(float("nan"))}
    with pytest.raises(NonFiniteLossError, match="term 'ce'.*no checkpoint had been written yet"):
        trainer._raise_non_finite(terms, 1, 0)
    (tmp_path / "checkpoints" / "epoch_0003").mkdir(parents=True)
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint is kept in .*epoch_0003"):
        trainer._raise_non_finite(terms, 4, 7)


def test_numeric_flag_types():
    assert positive_int("3") == 3 and nonnegative_int("0") == 0
    for fn, bad in ((positive_int, "0"), (positive_int, "-1"), (nonnegative_int, "-1"), (positive_int, "2.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


def test_cli_start_up_imports_no_torch():
    """`kdlab --help`, `--status` and every usage error stay light: the config-key epilog (which imports every method
    and torch) is built only when a command's --help is printed."""
    import sys

    code = "import sys; from kdlab.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
    helped = subprocess.run([sys.executable, "-m", "kdlab", "train", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "config keys (set in the YAML file" in helped.stdout and "method.temperature" in helped.stdout
