import json

import pytest

from kdlab.cli import main
from kdlab.engine import checkpoint as ck

from conftest import CONFIGS, SMALL, run_kdlab

KD = CONFIGS / "mnist1d" / "student_kd.yaml"


@pytest.fixture
def existing_run(tmp_path, teacher_run):
    """A finished distillation run whose files must survive every failed command."""
    out = tmp_path / "run"
    assert main(["distill", KD, "--out", out, "--quiet", f"teacher.checkpoint={teacher_run}", *SMALL]) == 0
    return out


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _teacher_file(tmp_path, arch="mnist1d_mlp", classes=10):
    """A real safetensors checkpoint of ``arch`` with ``classes`` outputs."""
    from kdlab.models import build

    path = tmp_path / f"{arch}_{classes}.safetensors"
    ck.save_weights(path, build(arch, num_classes=classes).state_dict())
    return path


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _cifar(tmp_path, n_train=2, labels=(0, 1)):
    import numpy as np

    root = tmp_path / "cifar"
    root.mkdir(exist_ok=True)
    imgs = np.zeros((n_train, 32, 32, 3), np.uint8)
    np.savez(root / "train.npz", images=imgs, fine_labels=np.array(labels[:n_train], dtype=np.int16))
    np.savez(root / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), fine_labels=np.array([0, 1], np.int16))
    return root


CE = CONFIGS / "mnist1d" / "student_ce.yaml"
RUN = "{run}"  # replaced by the existing run directory
T = "{teacher}"  # replaced by the teacher run directory

# (command and arguments, expected message); every case also passes --quiet and must leave the run untouched.
CASES = {
    "unknown model": (lambda t: ["distill", KD, "model.name=resnet9", "--out", RUN, "--overwrite"],
                      "unknown model 'resnet9' (did you mean 'resnet8'?)"),
    "unknown method": (lambda t: ["distill", KD, "method.name=dkdd", "--out", RUN, "--overwrite"], "unknown method 'dkdd'"),
    "unknown override key": (lambda t: ["distill", KD, "train.epoch=1", "--out", RUN, "--overwrite"],
                             "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "unknown section": (lambda t: ["distill", KD, "trian.epochs=1", "--out", RUN], "unknown key 'trian'"),
    "param of another method": (lambda t: ["train", CE, "method.temperature=4", "--out", RUN],
                                "unknown key 'method.temperature'"),
    "malformed yaml": (lambda t: ["train", _file(t, "x.yaml", "model: {name: a\nmethod: ["), "--out", RUN],
                       "malformed YAML in"),
    "yaml not a mapping": (lambda t: ["train", _file(t, "l.yaml", "- 1\n"), "--out", RUN], "must be a YAML mapping"),
    "missing config file": (lambda t: ["train", t / "none.yaml", "--out", RUN], "config file not found"),
    "override without =": (lambda t: ["train", CE, "train.epochs", "--out", RUN], "must look like key.sub=value"),
    "stray argument": (lambda t: ["train", CE, "--out", RUN, "stray"], "unrecognized arguments: stray"),
    "wrong type": (lambda t: ["distill", KD, "train.batch_size=big", "--out", RUN], "train.batch_size: Input should be a valid integer"),
    "zero temperature": (lambda t: ["distill", KD, "method.temperature=0", "--out", RUN], "method.temperature: Input should be greater than 0"),
    "negative temperature": (lambda t: ["distill", KD, "method.temperature=-2", "--out", RUN], "greater than 0"),
    "negative loss weight": (lambda t: ["distill", KD, "method.kd_weight=-1", "--out", RUN], "method.kd_weight: Input should be greater than or equal to 0"),
    "all weights zero": (lambda t: ["distill", KD, "method.kd_weight=0", "method.ce_weight=0", "--out", RUN], "all loss weights are zero"),
    "zero epochs": (lambda t: ["train", CE, "train.epochs=0", "--out", RUN], "train.epochs: Input should be greater than 0"),
    "zero learning rate": (lambda t: ["train", CE, "optim.lr=0", "--out", RUN], "optim.lr: Input should be greater than 0"),
    "momentum out of range": (lambda t: ["train", CE, "optim.momentum=1.5", "--out", RUN], "optim.momentum: Input should be less than 1"),
    "bad split fraction": (lambda t: ["train", CE, "data.train_split=1.5", "--out", RUN], "data.train_split"),
    "unknown dataset": (lambda t: ["train", CE, "data.name=imagenet", "--out", RUN], "unknown dataset 'imagenet'"),
    "missing data root": (lambda t: ["distill", KD, "data.name=cifar100", f"data.root={t / 'nowhere'}", "--out", RUN, "--overwrite"],
                          "cifar100: data root not found"),
    "empty data": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_cifar(t, 0)}", "--out", RUN, "--overwrite"], "empty"),
    "labels out of range": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_cifar(t, 2, (0, 100))}", "--out", RUN, "--overwrite"],
                            "labels must lie in [0, 99], found [0, 100]"),
    "teacher of another architecture": (lambda t: ["distill", KD, f"teacher.checkpoint={_teacher_file(t)}", "--out", RUN, "--overwrite"],
                                        "does not fit architecture 'mnist1d_cnn'"),
    "teacher/data class mismatch": (lambda t: ["distill", KD, f"teacher.checkpoint={_teacher_file(t, 'mnist1d_cnn', 100)}", "--out", RUN, "--overwrite"],
                                    "'fc.weight' has shape [100, 128] in the checkpoint but [10, 128] in the model"),
    "teacher file missing": (lambda t: ["distill", KD, f"teacher.checkpoint={t / 'no.safetensors'}", "--out", RUN, "--overwrite"], "checkpoint not found"),
    "teacher file corrupted": (lambda t: ["distill", KD, f"teacher.checkpoint={_file(t, 'bad.safetensors', b'garbage' * 9)}", "--out", RUN, "--overwrite"],
                               "is not a valid safetensors file"),
    "teacher folder without weights": (lambda t: ["distill", KD, f"teacher.checkpoint={t}", "--out", RUN, "--overwrite"], "folder without model.safetensors"),
    "distill without teacher": (lambda t: ["distill", KD, "teacher=null", "--out", RUN, "--overwrite"], "needs a teacher"),
    "train with a teacher method": (lambda t: ["train", KD, f"teacher.checkpoint={T}", "--out", RUN], "needs a teacher; use `kdlab distill`"),
    "distill with ce": (lambda t: ["distill", CE, "--out", RUN], "does not use a teacher; use `kdlab train`"),
    "run exists": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "--out", RUN], "already holds a run; pass --resume"),
    "resume and overwrite": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "--out", RUN, "--resume", "--overwrite"],
                             "exclude each other"),
    "resume with another config": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "optim.lr=0.3", "--out", RUN, "--resume"],
                                   "--resume with a different config: 'optim.lr'"),
    "out is a file": (lambda t: ["train", CE, "--out", _file(t, "f.txt", "x")], "exists and is not a folder"),
    "device not available": (lambda t: ["train", CE, "train.device=cuda", "--out", RUN, "--overwrite"], "CUDA is not available"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2_and_nothing_touched(case, tmp_path, existing_run, teacher_run, capsys):
    if case == "device not available" and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [str(a).replace(RUN, str(existing_run)).replace(T, str(teacher_run)) for a in CASES[case][0](tmp_path)]
    if "teacher" not in " ".join(args[2:]) and args[1] == str(KD):
        args.append(f"teacher.checkpoint={teacher_run}")
    before = _snapshot(existing_run)
    capsys.readouterr()
    try:
        code = main([*args[:2], *SMALL, *args[2:], "--quiet"])  # the case's own overrides win
    except SystemExit as exit_:  # argparse errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("kdlab: error: "), err
    assert CASES[case][1] in err, err
    assert _snapshot(existing_run) == before


def test_at_least_25_bad_input_cases():
    assert len(CASES) >= 25


def test_disk_full_on_checkpoint_write(existing_run, teacher_run, monkeypatch, capsys):
    """ENOSPC while resuming: one line, exit 2, every existing file intact, no temporary files left behind."""
    import errno
    import os

    before = _snapshot(existing_run)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["distill", "--resume", "--out", existing_run, "train.epochs=3", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("kdlab: error: could not write") and "No space left on device" in err
    monkeypatch.undo()
    assert _snapshot(existing_run) == before
    # and the run can be resumed once there is space again
    assert main(["distill", "--resume", "--out", existing_run, "train.epochs=3", "--quiet"]) == 0


def test_existing_run_needs_resume_or_overwrite(existing_run, teacher_run, capsys):
    before = _snapshot(existing_run)
    code = main(["distill", KD, "--out", existing_run, "--quiet", f"teacher.checkpoint={teacher_run}", *SMALL])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert _snapshot(existing_run) == before


def test_console_script_error_path_and_help():
    res = run_kdlab("train", CONFIGS / "mnist1d" / "student_ce.yaml", "--out", "/tmp/never", "model.name=nope")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in res.stderr
    res = run_kdlab("train", "--help")
    assert res.returncode == 0 and "method.temperature" in res.stdout and "schedule.milestones" in res.stdout


def test_train_distill_eval_end_to_end(tmp_path, teacher_run, capsys):
    out = tmp_path / "mse"
    assert main(["distill", CONFIGS / "mnist1d" / "student_mse.yaml", "--out", out, "--quiet",
                 f"teacher.checkpoint={teacher_run}", *SMALL]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "mse" and summary["teacher"] == "mnist1d_cnn" and summary["teacher_test_acc"] > 50
    assert main(["eval", out, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["acc"] == pytest.approx(summary["final_test_acc"]) and ev["n"] == 200
    assert main(["eval", teacher_run / "model.safetensors", "--config", teacher_run / "config.yaml"]) == 0
    assert "mnist1d_cnn test accuracy" in capsys.readouterr().out


def test_dry_run_writes_nothing(tmp_path, teacher_run, capsys):
    out = tmp_path / "dry"
    assert main(["distill", KD, "--out", out, "--dry-run", f"teacher.checkpoint={teacher_run}", *SMALL]) == 0
    assert "dry run ok" in capsys.readouterr().out and not out.exists()


def test_resume_from_run_config_alone(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", CONFIGS / "mnist1d" / "student_ce.yaml", "--out", out, *SMALL, "train.epochs=1"]) == 0
    assert main(["train", "--resume", "--out", out, "train.epochs=2", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", out, "--seeds", "2", "--teacher-epochs", "2", "--student-epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "| method | test accuracy (%) | seeds |" in text and "KD (T=4)" in text and "MSE" in text
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 5000
    assert len(list((out / "students").iterdir())) == 6
    # re-running reuses the finished runs (fast, same table)
    assert main(["demo", "--out", out, "--seeds", "2", "--teacher-epochs", "2", "--student-epochs", "2"]) == 0
    assert (out / "results.md").read_text().strip() in capsys.readouterr().out
