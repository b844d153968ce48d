"""Hostile files in a run folder, a recipe or a dataset (issue 19 §2) and outputs checked before work (§8).

Every reader refuses a device (``/dev/zero`` behind a symlink), a FIFO (without blocking) or a file over its kind's
limit in one line naming the file, exit code 2, with nothing of the run changed. Commands that write a file check it
before any work; ``--resume`` names a damaged ``config.yaml`` with its checksum; a skipped damaged checkpoint is a
warning that ``--quiet`` does not hide.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import CONFIGS, SMALL

CE = CONFIGS / "mnist1d" / "student_ce.yaml"
KD = CONFIGS / "mnist1d" / "student_kd.yaml"


@pytest.fixture(scope="module")
def _finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdlab.cli import main

    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", CE, "--out", out, "--quiet", *SMALL]) == 0
    return out


@pytest.fixture
def run(tmp_path: Path, _finished: Path) -> Path:
    return Path(shutil.copytree(_finished, tmp_path / "run", symlinks=True))


def _plant(path: Path, how: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    if how == "dev-zero":
        path.symlink_to("/dev/zero")
    elif how == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"{}\n" * 100)
    return path


def _regular_files(folder: Path) -> dict[Path, bytes]:
    """What a folder holds (regular files only: never reads what a planted link points to)."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if stat.S_ISREG(p.lstat().st_mode)}


DEVICE, FIFO = "is a device, not a regular file", "is a FIFO (named pipe), not a regular file"

# (where the hostile file goes, how, the command, the message); {run} / {t} are the run copy and the test's folder
CASES = {
    "report: metrics.jsonl -> /dev/zero (grew to 22.9 GiB)": ("{run}/metrics.jsonl", "dev-zero", ["report", "{run}", "--out", "{t}/r.html"], f"metrics file {{run}}/metrics.jsonl {DEVICE}"),
    "report: metrics.jsonl a FIFO": ("{run}/metrics.jsonl", "fifo", ["report", "{run}", "--out", "{t}/r.html"], f"metrics file {{run}}/metrics.jsonl {FIFO}"),
    "report: metrics.jsonl over KDLAB_MAX_BYTES_METRICS": ("{run}/metrics.jsonl", "big", ["report", "{run}", "--out", "{t}/r.html"],
                                                           "is 300 B, over the 100 B limit for metrics files (raise it with KDLAB_MAX_BYTES_METRICS=SIZE)"),
    "compare: summary.json -> /dev/zero": ("{run}/summary.json", "dev-zero", ["compare", "{run}"], f"{{run}}/summary.json {DEVICE}"),
    "resume: config.yaml -> /dev/zero": ("{run}/config.yaml", "dev-zero", ["train", "--resume", "--out", "{run}", "train.epochs=3"], f"config file {{run}}/config.yaml {DEVICE}"),
    "resume: config.yaml a FIFO": ("{run}/config.yaml", "fifo", ["train", "--resume", "--out", "{run}", "train.epochs=3"], f"config file {{run}}/config.yaml {FIFO}"),
    "resume: metrics.jsonl -> /dev/zero": ("{run}/metrics.jsonl", "dev-zero", ["train", "--resume", "--out", "{run}", "train.epochs=3"], f"metrics file {{run}}/metrics.jsonl {DEVICE}"),
    "eval: weights -> /dev/zero": ("{t}/w.safetensors", "dev-zero", ["eval", "{t}/w.safetensors", "--config", "{run}/config.yaml"], f"checkpoint {{t}}/w.safetensors {DEVICE}"),
    "distill: teacher.cache -> /dev/zero": ("{t}/c.safetensors", "dev-zero", ["distill", KD, "teacher.checkpoint={teacher}", "teacher.cache={t}/c.safetensors", "--out", "{t}/d"],
                                            f"teacher cache {{t}}/c.safetensors {DEVICE}"),
    "recipe: base is a FIFO": ("{t}/base.yaml", "fifo", ["train", "{t}/child.yaml", "--out", "{t}/d"], f"config file {{t}}/base.yaml {FIFO}"),
    "import-checkpoint: .pth -> /dev/zero": ("{t}/w.pth", "dev-zero", ["import-checkpoint", "{t}/w.pth", "--arch", "resnet8", "--out", "{t}/w.safetensors"],
                                             f"checkpoint {{t}}/w.pth {DEVICE}"),
    "cifar: train.npz -> /dev/zero": ("{t}/cifar/train.npz", "dev-zero", ["train", CE, "data.name=cifar100", "data.root={t}/cifar", "--out", "{t}/d"],
                                      f"data file {{t}}/cifar/train.npz {DEVICE}"),
    "cifar: pickle batch a FIFO": ("{t}/cifar-100-python/train", "fifo", ["train", CE, "data.name=cifar100", "data.root={t}/cifar-100-python", "--out", "{t}/d"],
                                   f"cifar100: data file {{t}}/cifar-100-python/train {FIFO}"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_one_line_exit_2_nothing_changed(case, tmp_path, run, teacher_run, no_hang, monkeypatch, capsys):
    from kdlab.cli import main

    where, how, argv, message = CASES[case]

    def fill(text: object) -> str:
        return str(text).format(run=run, t=tmp_path, teacher=teacher_run)

    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "test.npz").write_bytes(b"")
    (tmp_path / "cifar-100-python").mkdir()
    for name in ("test", "meta"):
        (tmp_path / "cifar-100-python" / name).write_bytes(b"")
    monkeypatch.setenv("KDLAB_MAX_BYTES_METRICS", "100")
    _plant(Path(fill(where)), how)
    before = _regular_files(run)
    capsys.readouterr()
    code = main([fill(a) for a in argv] + (["--quiet", *SMALL] if argv[0] in ("train", "distill") else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kdlab: error: "), err
    assert fill(message) in err[0], err
    assert _regular_files(run) == before


# -- §8: outputs are checked before any work ---------------------------------------------------------------------


def _never(*args, **kwargs):
    raise AssertionError("the work started before the output was checked")


@pytest.mark.parametrize(
    ("argv", "patch", "message"),
    [
        (["bench", "--json", "{t}"], "kdlab.bench.run_bench", "--json {t} is a folder; give a file name"),
        (["bench", "--json", "{t}/f.txt/b.json"], "kdlab.bench.run_bench", "cannot write {t}/f.txt/b.json: {t}/f.txt is not a folder"),
        (["compare", "{t}", "--csv", "{t}"], "kdlab.pipelines.compare_rows", "--csv {t} is a folder; give a file name"),
        (["compare", "{t}", "--md", "{t}/f.txt/r.md"], "kdlab.pipelines.compare_rows", "{t}/f.txt is not a folder"),
        (["report", "{t}", "--out", "{t}/f.txt/r.html"], "kdlab.instruments.report.metric_runs", "{t}/f.txt is not a folder"),
        (["report", "{t}", "--out", "{t}/exists.html"], "kdlab.instruments.report.metric_runs", "{t}/exists.html already exists; pass --overwrite"),
        (["export-images", "{t}", "--out", "{t}/f.txt/x"], "kdlab.data.cifar.read_cifar", "{t}/f.txt is not a folder"),
        (["export-images", "{t}", "--out", "{t}"], "kdlab.data.cifar.read_cifar", "--out {t} already exists and is not an empty folder"),
        (["import-checkpoint", "{t}/w.pth", "--arch", "resnet8", "--out", "{t}/f.txt/w.safetensors"], "kdlab.models.convert.read_checkpoint",
         "{t}/f.txt is not a folder"),
    ],
    ids=["bench json folder", "bench json below a file", "compare csv folder", "compare md below a file",
         "report below a file", "report exists", "export below a file", "export into a full folder", "import below a file"],
)
def test_outputs_are_checked_before_work(tmp_path, monkeypatch, capsys, argv, patch, message):
    """`kdlab bench --json BADPATH` found the bad path only after 400 s of benchmarking."""
    from kdlab.cli import main

    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "exists.html").write_text("mine")
    monkeypatch.setattr(patch, _never)
    code = main([a.format(t=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message.format(t=tmp_path) in err[0], err
    assert (tmp_path / "exists.html").read_text() == "mine"


# -- §8: a damaged config.yaml on --resume; a skipped checkpoint is a warning --------------------------------------


@pytest.mark.parametrize(("content", "state"), [(b"", "is empty"), (b"model: {name: mnist1d_mlp\n", "is damaged (malformed YAML")])
def test_resume_names_a_damaged_config_and_its_checksum(run, capsys, content, state):
    import hashlib

    from kdlab.cli import main
    from kdlab.fileio import read_json

    (run / "config.yaml").write_bytes(content)
    before = _regular_files(run)
    want = read_json(run / "checkpoints" / "epoch_0002" / "state.json")["config_sha256"]
    code = main(["train", "--resume", "--out", str(run), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"kdlab: error: {run}/config.yaml {state}")
    assert (f"its SHA-256 {hashlib.sha256(content).hexdigest()[:12]}… does not match the {want[:12]}… recorded by "
            f"checkpoint epoch_0002; restore it (the original is under 'config' in {run}/checkpoints/epoch_0002/"
            "state.json)") in err[0]  # fmt: skip
    assert "missing required key" not in err[0] and _regular_files(run) == before


def test_a_skipped_damaged_checkpoint_is_a_warning_with_quiet(run, capsys):
    from kdlab.cli import main

    _plant(run / "checkpoints" / "epoch_0002" / "state.json", "dev-zero")
    code = main(["train", "--resume", "--out", str(run), "--quiet", "train.epochs=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 0 and len(err) == 1, err
    assert err[0] == (f"kdlab: warning: skipping damaged checkpoint epoch_0002: checkpoint state "
                      f"{run}/checkpoints/epoch_0002/state.json {DEVICE}")  # fmt: skip
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["epoch_0002", "epoch_0003"]
