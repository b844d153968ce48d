import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config import ScheduleConfig, load_config
from kdlab.engine import Trainer, run
from kdlab.engine import checkpoint as ck
from kdlab.engine.schedule import lr_at
from kdlab.errors import KdlabError

from conftest import CONFIGS, SMALL


def test_multistep_schedule_matches_the_benchmark_convention():
    cfg = ScheduleConfig(name="multistep", milestones=[150, 180, 210], gamma=0.1)
    lrs = {e: lr_at(e, 0.05, 240, cfg) for e in (1, 150, 151, 180, 181, 211, 240)}
    assert lrs[1] == lrs[150] == 0.05
    assert lrs[151] == pytest.approx(0.005) and lrs[181] == pytest.approx(0.0005) and lrs[240] == pytest.approx(5e-5)


def test_cosine_and_warmup():
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, min_lr=0.0)
    assert lr_at(1, 0.1, 12, cfg) == pytest.approx(0.05) and lr_at(2, 0.1, 12, cfg) == pytest.approx(0.1)
    assert lr_at(3, 0.1, 12, cfg) == pytest.approx(0.1)
    assert lr_at(8, 0.1, 12, cfg) == pytest.approx(0.05)
    assert lr_at(12, 0.1, 12, cfg) < lr_at(11, 0.1, 12, cfg) < 0.01


def _cfg(*extra):
    return load_config(CONFIGS / "mnist1d" / "student_ce.yaml", SMALL + list(extra))


def test_run_directory_contents(tmp_path):
    res = run(_cfg(), tmp_path / "r")
    out = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors", "best.safetensors"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_ce", "train_acc", "test_acc", "lr", "images_per_s"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().count("\n") == 3
    s = json.loads((out / "summary.json").read_text())
    assert s == res.summary and s["final_test_acc"] == rows[-1]["test_acc"] and s["epochs"] == 2
    assert s["best_test_acc"] == max(r["test_acc"] for r in rows) and s["train_images_per_s"] > 0
    assert load_config(out / "config.yaml") == _cfg()


def test_resume_in_process_gives_identical_weights(tmp_path):
    run(_cfg("train.epochs=3"), tmp_path / "full")
    run(_cfg("train.epochs=3", "train.keep_checkpoints=3"), tmp_path / "part")
    # roll the second run back to the end of epoch 1, as if it had been killed during epoch 2, and resume it
    ckpts = ck.list_checkpoints(tmp_path / "part" / "checkpoints")
    assert [p.name for p in ckpts] == ["epoch_0003", "epoch_0002", "epoch_0001"]
    for p in ckpts[:2]:
        shutil.rmtree(p)
    (tmp_path / "part" / "model.safetensors").unlink()
    Trainer(_cfg("train.epochs=3", "train.keep_checkpoints=3"), tmp_path / "part", resume=True).run()
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(x)["epoch"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


def test_corrupted_checkpoint_falls_back_to_the_previous_good_one(tmp_path):
    run(_cfg("train.epochs=3"), tmp_path / "r")
    newest = ck.list_checkpoints(tmp_path / "r" / "checkpoints")[0]
    data = (newest / "state.safetensors").read_bytes()
    (newest / "state.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match="checksum mismatch"):
        state = ck.load_latest(tmp_path / "r" / "checkpoints")
    assert state is not None and state.meta["epoch"] == 2
    with pytest.raises(KdlabError, match="checksum mismatch"):
        ck.verify_checkpoint(newest)


def test_existing_run_is_protected(tmp_path):
    out = tmp_path / "r"
    run(_cfg("train.epochs=1"), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(KdlabError, match="already holds a run; pass --resume .* or --overwrite"):
        Trainer(_cfg("train.epochs=1"), out)
    with pytest.raises(KdlabError, match="different config: 'optim.lr'"):
        Trainer(_cfg("train.epochs=1", "optim.lr=0.1"), out, resume=True)
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(KdlabError, match="not empty and is not a kdlab run"):
        Trainer(_cfg(), other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"


def test_overwrite_replaces_only_after_validation(tmp_path):
    out = tmp_path / "r"
    run(_cfg("train.epochs=1"), out)
    with pytest.raises(KdlabError):
        Trainer(_cfg("train.epochs=1", "data.root=" + str(tmp_path / "missing"), "data.name=cifar100"), out, overwrite=True)
    assert (out / "model.safetensors").is_file()  # untouched by the failed attempt
    run(_cfg("train.epochs=2"), out, overwrite=True)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    with pytest.raises(KdlabError, match=r"non-finite loss \(term 'ce'\) at epoch 1, step \d+; stopped"):
        run(_cfg("optim.lr=1e30", "optim.momentum=0"), tmp_path / "r")


def _final_weights(path):
    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_identical_weights(tmp_path):
    """Kill a real `kdlab train` process with SIGKILL at random moments, resume each time, compare weights."""
    args = ["train", CONFIGS / "mnist1d" / "teacher_cnn.yaml", "--quiet", "data.num_samples=1500",
            "train.epochs=6", "train.batch_size=16", "train.threads=1", "seed=5"]  # fmt: skip
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "kdlab", *map(str, args), "--out", ref], check=True, capture_output=True)
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    cmd = [sys.executable, "-m", "kdlab", *map(str, args), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        # wait until a checkpoint exists past the previous kill point, then kill at a random moment
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            done = ck.list_checkpoints(out / "checkpoints")
            if done and int(done[0].name[6:]) > kills:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.6))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        proc = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.returncode == 0, proc.stderr.read().decode()
    assert kills >= 2
    a, b = _final_weights(ref), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, 7))


def test_resume_accepts_a_run_saved_before_a_config_key_existed(tmp_path):
    """config.yaml of an older kdlab lacks newer keys; resuming fills in their defaults instead of refusing."""
    import yaml

    out = tmp_path / "r"
    run(_cfg("train.epochs=1"), out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["shift"], saved["train"]["compile"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert Trainer(_cfg("train.epochs=2"), out, resume=True).run().summary["epochs"] == 2
