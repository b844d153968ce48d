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


def _bad_teacher(tmp_path):
    """A real checkpoint of another architecture (MLP weights named as a CNN teacher)."""
    from kdlab.models import build

    path = tmp_path / "mlp.safetensors"
    ck.save_weights(path, build("mnist1d_mlp", num_classes=10).state_dict())
    return path


def _malformed(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: {name: mnist1d_mlp\nmethod: [")
    return path


CASES = {
    "unknown model": (lambda t: [KD, "model.name=resnet9"], "unknown model 'resnet9' (did you mean 'resnet8'?)"),
    "unknown method": (lambda t: [KD, "method.name=dkdd"], "unknown method 'dkdd'"),
    "unknown override key": (lambda t: [KD, "train.epoch=1"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "malformed yaml": (lambda t: [_malformed(t)], "malformed YAML in"),
    "missing data root": (
        lambda t: [KD, "data.name=cifar100", f"data.root={t / 'nowhere'}"], "cifar100: data root not found"),
    "teacher shapes": (
        lambda t: [KD, f"teacher.checkpoint={_bad_teacher(t)}"], "does not fit architecture 'mnist1d_cnn'"),
    "missing teacher file": (lambda t: [KD, f"teacher.checkpoint={t / 'no.safetensors'}"], "checkpoint not found"),
    "negative temperature": (lambda t: [KD, "method.temperature=0"], "method.temperature: Input should be greater than 0"),
    "wrong type": (lambda t: [KD, "train.batch_size=big"], "train.batch_size: Input should be a valid integer"),
    "missing config": (lambda t: [t / "none.yaml"], "config file not found"),
    "train with a teacher method": (lambda t: ["--train", KD], "needs a teacher; use `kdlab distill`"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2_and_nothing_touched(case, tmp_path, existing_run, teacher_run, capsys):
    make_args, message = CASES[case]
    args = make_args(tmp_path)
    command = "distill"
    if args[0] == "--train":
        command, args = "train", args[1:]
    before = _snapshot(existing_run)
    capsys.readouterr()
    code = main([command, *args, "--out", existing_run, "--overwrite", "--quiet", f"teacher.checkpoint={teacher_run}"]
                if case not in ("teacher shapes", "missing teacher file")
                else [command, *args, "--out", existing_run, "--overwrite", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("kdlab: error: ") and "\n" not in err, err
    assert message in err, err
    assert _snapshot(existing_run) == before


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
