"""Code named in a config is decided before it is imported (issue 19 §1, :mod:`kdlab.trust`).

Every module under test writes a marker file when its top level runs: a refusal must leave no marker, in every
command that reads a config (train, distill, eval, analyze, report, sweep, chain, cache-teacher) and in the Python
API. The allowed paths (an installed package's nn.Module class without the flag; a .py file with --trust-code) run
and are recorded in the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlab import trust
from kdlab.config import DataConfig, load_config, validate
from kdlab.engine import checkpoint as ck
from kdlab.errors import ConfigError
from kdlab.trust import FOLDERS_ENV, UntrustedCodeError, import_object, resolve_code, set_trust, trusting

from conftest import CONFIGS, SMALL, write_yaml
from test_run_integrity import _cli, _one_line_error as _one_line

pytestmark = pytest.mark.usefixtures("one_thread")

CE = CONFIGS / "mnist1d" / "student_ce.yaml"

#: a module that leaves a marker when imported, and offers a model class and a dataset builder
EVIL = """
import pathlib, torch
from torch import nn
pathlib.Path({marker!r}).write_text("imported")

class Net(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(40, num_classes)
    def forward(self, x):
        return self.fc(x)

def build(cfg):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(100) % 10
    x = torch.randn(100, 40, generator=g) + y[:, None]
    return {{"train": (x[:80], y[:80]), "test": (x[80:], y[80:]), "num_classes": 10}}
"""


@pytest.fixture(autouse=True)
def _fresh_trust(monkeypatch):
    """No trust unless a test asks for it; the environment variables of other tests do not leak in."""
    monkeypatch.delenv(trust.TRUST_ENV, raising=False)
    monkeypatch.delenv(FOLDERS_ENV, raising=False)
    monkeypatch.setattr(trust, "_distrusted", {})  # folders distrusted by earlier tests of the session
    set_trust(None)
    yield
    set_trust(None)
    trust._installed_roots.cache_clear()


class Code:
    """Marker-writing user code in ``folder``: ``evil.py`` and the package ``evilpkg`` (``evilpkg.nets``)."""

    def __init__(self, folder: Path, tag: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.marker = folder, folder / f"MARKER_{tag}"
        (folder / "evil.py").write_text(EVIL.format(marker=str(self.marker)))
        pkg = folder / f"evilpkg_{tag}"
        pkg.mkdir(exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "nets.py").write_text(EVIL.format(marker=str(self.marker)))
        self.pkg = pkg.name

    def file(self, attr: str) -> str:
        return f"{self.folder / 'evil.py'}:{attr}"

    def module(self, attr: str) -> str:
        return f"{self.pkg}.nets:{attr}"

    @property
    def ran(self) -> bool:
        return self.marker.exists()


def _importable(monkeypatch, folder: Path) -> None:
    """``folder`` on sys.path, as ``python -m kdlab`` puts the current directory there (or PYTHONPATH would)."""
    monkeypatch.syspath_prepend(str(folder))


def _recipe(folder: Path, name: str = "cfg.yaml", distill: bool = False, **sections) -> Path:
    raw: dict = {"base": str(CONFIGS / "mnist1d" / ("student_kd.yaml" if distill else "student_ce.yaml"))}
    if distill:
        raw["teacher"] = {"name": "mnist1d_cnn", "checkpoint": str(folder / "teacher.safetensors")}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value) if isinstance(value, dict) else raw.__setitem__(key, value)
    return write_yaml(folder / name, raw)


def _run_folder(folder: Path, model: dict, data: dict | None = None) -> Path:
    """A downloaded "run folder": config.yaml naming code that ships beside it, weights, metrics."""
    raw = load_config(CE).to_dict()
    raw["model"] = model
    if data is not None:
        raw["data"].update(data)
    write_yaml(folder / "config.yaml", raw)
    ck.save_weights(folder / "model.safetensors", {"fc.weight": torch.zeros(10, 40), "fc.bias": torch.zeros(10)})
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 10.0}) + "\n")
    (folder / "summary.json").write_text(json.dumps({"final_test_acc": 10.0, "epochs": 1}))
    return folder


# ---- every command, two kinds of reference -----------------------------------------------------------------------


def _command(command: str, t: Path, code: Code, ref: str, key: str) -> list:
    """Arguments of ``command`` whose config names ``ref`` under ``key`` (``model.name`` or ``data.name``)."""
    section, field = key.split(".")
    value = {field: ref, **({"classifier": "fc"} if section == "model" else {})}
    if command in ("eval", "analyze", "report", "train --resume"):
        run = _run_folder(code.folder, value if section == "model" else {"name": "mnist1d_mlp"},
                          value if section == "data" else None)  # fmt: skip
        if command == "train --resume":
            return ["train", "--resume", "--out", run]
        extra = {"analyze": ["--no-teacher"], "report": ["--out", t / "r.html"]}.get(command, [])
        return [command, run, *extra]
    recipe = _recipe(code.folder, distill=command in ("distill", "cache-teacher"), **{section: value})
    if command in ("train", "distill"):
        return [command, recipe, *SMALL, "--out", t / "out"]
    if command == "sweep":
        return ["sweep", recipe, "--grid", "optim.lr=0.1,0.2", "--out", t / "sw", "--jobs", "2"]
    if command == "chain":
        spec = write_yaml(code.folder / "study.yaml", {"seeds": 1, "stages": [{"name": "a", "recipe": str(CE)},
                                                                           {"name": "b", "recipe": str(recipe)}]})
        return ["chain", spec, "--out", t / "ch"]
    return ["cache-teacher", recipe, "--views", "1", "--out", t / "c.safetensors"]


COMMANDS = ["train", "distill", "train --resume", "eval", "analyze", "report", "sweep", "chain", "cache-teacher"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", ["data.name file.py:build", "model.name pkg.module:Net in the current directory"])
def test_every_command_refuses_before_importing(command, kind, tmp_path, monkeypatch, capsys):
    code = Code(tmp_path / "downloaded", "cmd")
    if kind.startswith("data"):
        key, ref = "data.name", code.file("build")
    else:
        key, ref = "model.name", code.module("Net")
        monkeypatch.chdir(code.folder)  # the user cd'ed into the downloaded folder and ran `python -m kdlab`
        _importable(monkeypatch, code.folder)
    args = _command(command, tmp_path, code, ref, key)
    before = sorted(p.name for p in code.folder.iterdir())
    status, err = _cli(capsys, *args)
    assert not code.ran, (command, err)
    if command == "report":  # reads config.yaml as text, builds nothing: nothing to refuse, nothing imported
        assert status == 0, err
        return
    line = _one_line(err)
    assert status == 2 and key in line and ref in line and "--trust-code" in line, line
    assert sorted(p.name for p in code.folder.iterdir() if not p.name.startswith(".kdlab")) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "sw").exists() and not (tmp_path / "ch").exists()


# ---- every key, every place code can come from --------------------------------------------------------------------


def _member(ref: str) -> dict:
    return {"ensemble": [{"name": ref, "classifier": "fc", "checkpoint": "t.safetensors"}]}


KEYS = {
    # (key in the message, recipe sections for a reference `ref`, distill?)
    "data.name": (lambda ref: {"data": {"name": ref}}, False),
    "model.name": (lambda ref: {"model": {"name": ref, "classifier": "fc"}}, False),
    "teacher.name": (lambda ref: {"teacher": {"name": ref, "classifier": "fc"}}, True),
    "teacher.ensemble[0].name": (lambda ref: {"teacher": _member(ref)}, True),
}
PLACES = ["file", "module in the current directory", "module in the config's folder", "module in the run folder"]


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("place", PLACES)
def test_each_code_key_from_each_local_place_is_refused(key, place, tmp_path, monkeypatch, capsys):
    code = Code(tmp_path / "code", "key")
    attr = "build" if key == "data.name" else "Net"
    ref = code.file(attr) if place == "file" else code.module(attr)
    sections, distill = KEYS[key]
    cfg_dir, out = tmp_path / "cfg", tmp_path / "out"
    if place != "file":
        _importable(monkeypatch, code.folder)
    if place == "module in the current directory":
        monkeypatch.chdir(code.folder)
    elif place == "module in the config's folder":
        cfg_dir = code.folder
    elif place == "module in the run folder":
        out = code.folder  # --out names the folder the code sits in
    cfg_dir.mkdir(exist_ok=True)
    recipe = _recipe(cfg_dir, distill=distill, **sections(ref))
    status, err = _cli(capsys, "distill" if distill else "train", recipe, *SMALL, "--out", out)
    line = _one_line(err)
    assert status == 2 and f"{key} '{ref}'" in line and "--trust-code" in line, line
    assert not code.ran
    if place != "file":
        role = {"module in the current directory": "current directory", "module in the config's folder":
                "config's folder", "module in the run folder": "run folder"}[place]  # fmt: skip
        assert f"is not installed ({code.folder / code.pkg / '__init__.py'} lies in the {role}" in line, line


def test_eval_of_a_downloaded_run_never_runs_its_code(tmp_path, monkeypatch, capsys):
    """`kdlab eval RUN` where RUN/config.yaml names RUN/evil.py:Net (an nn.Module), or a package shipped in RUN."""
    code = Code(tmp_path / "run", "eval")
    run = _run_folder(code.folder, {"name": code.file("Net"), "classifier": "fc"})
    status, err = _cli(capsys, "eval", run)
    assert status == 2 and "model.name" in _one_line(err) and "names code in a Python file" in err
    assert not code.ran
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["model"]["name"] = code.module("Net")
    write_yaml(run / "config.yaml", raw)
    _importable(monkeypatch, run)  # e.g. PYTHONPATH=. from inside the run folder
    status, err = _cli(capsys, "eval", run)
    assert status == 2 and "is not installed" in _one_line(err) and f"lies in the run folder {run}" in err
    assert not code.ran
    status, err = _cli(capsys, "eval", run, "--trust-code")  # the user decides to trust it: it runs
    assert status == 0, err
    assert code.ran


# ---- the Python API ------------------------------------------------------------------------------------------------


def test_python_api_applies_the_same_policy(tmp_path, monkeypatch):
    from kdlab.data import build_dataset
    from kdlab.models import build

    code = Code(tmp_path / "code", "api")
    recipe = _recipe(code.folder, model={"name": code.file("Net"), "classifier": "fc"})
    with pytest.raises(UntrustedCodeError, match=r"model.name '.*evil.py:Net' names code in a Python file"):
        load_config(recipe)
    raw = load_config(CE).to_dict()
    raw["data"]["name"] = code.file("build")
    with pytest.raises(UntrustedCodeError, match="data.name"):
        validate(raw)
    with pytest.raises(UntrustedCodeError, match="data.name"):
        DataConfig(name=code.file("build"))
    with pytest.raises(UntrustedCodeError, match="teacher.name"):
        from kdlab.config import TeacherConfig

        TeacherConfig(name=code.file("Net"), classifier="fc", checkpoint="x")
    with pytest.raises(UntrustedCodeError, match="model.name"):
        build(code.file("Net"), num_classes=10, classifier="fc")
    with pytest.raises(UntrustedCodeError):
        build_dataset(DataConfig.model_construct(name=code.file("build")))  # never validated: the import gate holds
    assert not code.ran
    with trusting():
        assert load_config(recipe).model.name == code.file("Net")
    assert code.ran


# ---- what counts as installed ---------------------------------------------------------------------------------------


def test_installed_packages_pass_wherever_the_current_directory_is(monkeypatch, tmp_path):
    from torch import nn

    site_packages = Path(torch.__file__).resolve().parents[1]
    monkeypatch.chdir(site_packages.parent)  # a project's .venv inside the current directory
    assert resolve_code("torch.nn:Linear", what="model.name", kind="model") is nn.Linear
    # kdlab itself: an editable install whose source lies below the repository (the tests' current directory)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    from kdlab.models.mnist1d import Mnist1dMLP

    assert resolve_code("kdlab.models.mnist1d:Mnist1dMLP", what="model.name", kind="model") is Mnist1dMLP
    # an installed module's factory is a callable, not a class: needs the flag, then is recorded
    with pytest.raises(UntrustedCodeError, match=r"model.name 'subprocess:Popen' is a type, not a subclass of "
                                                 r"nn.Module.*--trust-code"):  # fmt: skip
        resolve_code("subprocess:Popen", what="model.name", kind="model")
    with pytest.raises(UntrustedCodeError, match="data.name 'os.path:join' is a function; .*--trust-code"):
        resolve_code("os.path:join", what="data.name", kind="builder")
    with pytest.raises(ConfigError, match="no module named 'no_such_pkg_xyz' is installed"):
        import_object("no_such_pkg_xyz.mod:Net", what="model.name")


def _fake_site(monkeypatch, tmp_path) -> Path:
    """A site-packages folder of this interpreter (as far as kdlab.trust can tell), empty."""
    site_dir = tmp_path / "site-packages"
    site_dir.mkdir()
    real = trust._site_dirs()
    monkeypatch.setattr(trust, "_site_dirs", lambda: [*real, site_dir.resolve()])
    trust._installed_roots.cache_clear()  # read again, with this folder's .pth files
    return site_dir


def test_editable_installs_in_the_current_directory_pass(tmp_path, monkeypatch):
    """A project installed with `pip install -e .` (a .pth path or a dist-info naming the project) counts as
    installed although it lies in the current directory; a neighbour it does not provide does not."""
    site_dir = _fake_site(monkeypatch, tmp_path)
    project = tmp_path / "project"
    mine = Code(project / "src", "pth")  # src layout: the .pth file adds project/src
    flat = Code(project, "flat")  # flat layout: a finder maps the package; dist-info names it
    (site_dir / "__editable__.mine-0.1.pth").write_text(f"{project / 'src'}\n")
    info = site_dir / "flat-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: flat\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{flat.pkg}\n")
    (info / "direct_url.json").write_text(json.dumps({"url": project.as_uri(), "dir_info": {"editable": True}}))
    monkeypatch.syspath_prepend(str(site_dir))
    _importable(monkeypatch, project / "src")
    _importable(monkeypatch, project)
    monkeypatch.chdir(project)
    assert resolve_code(mine.module("Net"), what="model.name", kind="model").__name__ == "Net"
    assert resolve_code(flat.module("Net"), what="model.name", kind="model").__name__ == "Net"
    assert mine.ran and flat.ran
    other = Code(project / "other", "other")  # in the project folder, provided by no install
    _importable(monkeypatch, other.folder)
    with pytest.raises(UntrustedCodeError, match="is not installed .* lies in the current directory"):
        resolve_code(other.module("Net"), what="model.name", kind="model")
    assert not other.ran


def test_a_dist_info_in_the_current_directory_does_not_make_code_installed(tmp_path, monkeypatch):
    """An attacker's folder can hold a fake dist-info claiming its package: only site-packages' records count."""
    code = Code(tmp_path / "dl", "fake")
    info = code.folder / "fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake\nVersion: 0.1\n")
    (info / "top_level.txt").write_text(f"{code.pkg}\n")
    (info / "direct_url.json").write_text(json.dumps({"url": code.folder.as_uri(), "dir_info": {"editable": True}}))
    (code.folder / "evil.pth").write_text(f"{code.folder}\n")
    _importable(monkeypatch, code.folder)
    monkeypatch.chdir(code.folder)
    with pytest.raises(UntrustedCodeError, match="is not installed"):
        resolve_code(code.module("Net"), what="model.name", kind="model")
    assert not code.ran


def test_each_submodule_is_checked_before_it_runs(tmp_path, monkeypatch):
    """A namespace package with a portion outside and a portion inside the current directory: the outside
    submodule is imported, the one in the current directory is refused before its code runs."""
    outside, inside = tmp_path / "elsewhere", tmp_path / "cwd"
    for folder in (outside, inside):
        (folder / "nspkg_t").mkdir(parents=True)
    good, bad = outside / "MARKER_good", inside / "MARKER_bad"
    (outside / "nspkg_t" / "good.py").write_text(EVIL.format(marker=str(good)))
    (inside / "nspkg_t" / "bad.py").write_text(EVIL.format(marker=str(bad)))
    _importable(monkeypatch, outside)
    _importable(monkeypatch, inside)
    monkeypatch.chdir(inside)
    assert resolve_code("nspkg_t.good:Net", what="model.name", kind="model").__name__ == "Net" and good.exists()
    with pytest.raises(UntrustedCodeError, match=r"module 'nspkg_t.bad' is not installed"):
        resolve_code("nspkg_t.bad:Net", what="model.name", kind="model")
    assert not bad.exists()


def test_names_are_classified_without_importing():
    assert trust.parse_code_ref("resnet8", "model.name") is None
    ref = trust.parse_code_ref("~/x/nets.py:Net", "model.name")
    assert ref is not None and ref.file == Path("~/x/nets.py").expanduser() and ref.module is None
    ref = trust.parse_code_ref("a.b.c:Outer.Inner", "model.name")
    assert ref is not None and ref.module == "a.b.c" and ref.attr == "Outer.Inner" and ref.file is None
    for bad, why in (("a/b:Net", "is not a .py file"), ("..rel:Net", "must look like"), ("a.b:", "must look like"),
                     ("a-b.c:Net", "must look like"), ("a:1x", "must look like")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            trust.parse_code_ref(bad, "model.name")
    assert trust.parse_code_ref("zz_never_imported_pkg.mod:X", "k").module == "zz_never_imported_pkg.mod"
    assert "zz_never_imported_pkg" not in sys.modules


def test_workers_inherit_trust_and_distrusted_folders(tmp_path, monkeypatch):
    trust.distrust_folder(tmp_path, "run folder")
    env = trust.child_env()
    assert str(tmp_path.resolve()) in env[FOLDERS_ENV].split(os.pathsep) and trust.TRUST_ENV not in env
    with trusting():
        assert trust.child_env()[trust.TRUST_ENV] == "1"
    monkeypatch.setenv(FOLDERS_ENV, str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere", "folder distrusted by the parent process") in trust._local_folders()


# ---- allowed, and recorded -------------------------------------------------------------------------------------------


def test_installed_class_needs_no_flag_and_a_trusted_file_is_recorded(tmp_path, capsys):
    small = [*SMALL, "train.epochs=1", "--quiet"]
    status, err = _cli(capsys, "train", CE, "model.name=kdlab.models.mnist1d:Mnist1dMLP", "model.classifier=fc",
                       *small, "--out", tmp_path / "installed")  # fmt: skip
    assert status == 0, err
    assert "trusted_code" not in json.loads((tmp_path / "installed" / "summary.json").read_text())
    code = Code(tmp_path / "mine", "ok")
    recipe = _recipe(code.folder, model={"name": code.file("Net"), "classifier": "fc"}, data={"name": code.file("build")})
    status, err = _cli(capsys, "train", recipe, *small, "--out", tmp_path / "trusted", "--trust-code")
    assert status == 0, err
    assert code.ran
    summary = json.loads((tmp_path / "trusted" / "summary.json").read_text())
    assert summary["trusted_code"] == [code.file("build"), code.file("Net")]
