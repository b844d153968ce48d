"""requirements/: the lock files `make install` / `make demo` / `make test` install from (hash-checked, one version
each), kept in step with pyproject.toml (``python requirements/lock.py check``, which the Makefile runs first)."""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from conftest import REPO

REQ = REPO / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", re.MULTILINE)


def _lock_module():
    spec = importlib.util.spec_from_file_location("kdlab_lock", REQ / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(name: str) -> dict[str, str]:
    text = (REQ / name).read_text()
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    pins = {_norm(m[1]): m[2] for m in PIN.finditer(text)}
    assert len(body) == 2 * len(pins), f"{name}: every entry is one `name==version \\` line and one --hash line"
    return pins


def test_every_package_is_pinned_once_with_a_hash():
    torch_pin, run, extras = _pins("torch-cpu.txt"), _pins("lock-run.txt"), _pins("lock-extras.txt")
    assert list(torch_pin) == ["torch"] and torch_pin["torch"].startswith("2.13.0")
    assert not set(run) & set(extras) and "torch" not in run and "torch" not in extras and "kdlab" not in run


def test_lock_fits_pyproject_and_this_interpreter(capsys):
    lock = _lock_module()
    assert lock.check() == 0, capsys.readouterr().err  # same dependencies as pyproject.toml, same target platform
    project = lock._project()
    run, extras = _pins("lock-run.txt") | _pins("torch-cpu.txt"), _pins("lock-extras.txt")
    wanted = [(r, run) for r in project["dependencies"]]
    wanted += [(r, run | extras) for name, reqs in project["optional-dependencies"].items()
               if name not in lock.SKIP_EXTRAS for r in reqs]  # fmt: skip
    for text, pins in wanted:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert _norm(req.name) in pins, f"{req.name} is missing from the lock"
        assert req.specifier.contains(pins[_norm(req.name)].split("+")[0], prereleases=True), (text, pins[_norm(req.name)])


def test_this_environment_runs_the_locked_versions():
    """What `make install` gives: kdlab's direct dependencies at the locked versions (the README's numbers were
    measured with them; a drifted .venv fails here)."""
    run = _pins("lock-run.txt") | _pins("torch-cpu.txt")
    for text in metadata.requires("kdlab") or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        assert metadata.version(req.name) == run[_norm(req.name)], req.name


def test_check_refuses_another_platform_or_changed_dependencies(monkeypatch, capsys):
    lock = _lock_module()
    monkeypatch.setattr(lock, "target", lambda: "cpython-3.99 plan9-mips")
    assert lock.check() == 1 and "make ... LOCKED=0" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(lock, "inputs_digest", lambda: "0" * 16)
    assert lock.check() == 1 and "run `make lock`" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform != "linux", reason="the lock's wheels are Linux ones")
def test_makefile_installs_from_the_lock_with_hashes():
    text = (REPO / "Makefile").read_text()
    for needle in ("lock.py check", "--require-hashes --no-deps -r $(REQ)/lock-run.txt",
                   "--require-hashes --no-deps -r $(REQ)/lock-extras.txt", "pip check"):
        assert needle in text, needle
