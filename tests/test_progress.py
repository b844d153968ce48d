"""Live progress: running loss terms on the bar (no per-step sync), loss terms in epoch lines, rank 0 only."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

from conftest import CONFIGS, SMALL


def test_bar_shows_running_losses_every_n_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdlab.engine import progress

    bar = tqdm(total=100, file=io.StringIO(), disable=False)
    sums = {"kd": torch.tensor(6.0), "loss": torch.tensor(9.0), "ce": torch.tensor(3.0)}
    syncs = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(1) or real(t))
    progress.show_running_losses(bar, 0, sums, 3)
    assert bar.postfix == "loss=3, ce=1, kd=2"  # running means, total loss first
    sums["loss"] += 3.0
    for step in range(1, progress.REFRESH_EVERY):
        progress.show_running_losses(bar, step, sums, 3)
    assert bar.postfix == "loss=3, ce=1, kd=2" and len(syncs) == 1  # no host transfer between refreshes
    progress.show_running_losses(bar, progress.REFRESH_EVERY, sums, 4)
    assert bar.postfix == "loss=3, ce=0.75, kd=1.5" and len(syncs) == 2
    quiet = tqdm(total=10, file=io.StringIO(), disable=True)
    progress.show_running_losses(quiet, 0, sums, 3)
    assert len(syncs) == 2  # a hidden bar (quiet, rank > 0) costs nothing


def test_epoch_line_lists_loss_terms() -> None:
    from kdlab.engine.progress import epoch_line

    row = {"epoch": 3, "train_ce": 0.04123, "train_kd": 0.3711, "train_loss": 0.41233, "train_acc": 91.2,
           "test_acc": 88.4, "test_top5": 99.1, "lr": 0.05, "images_per_s": 5123.4}  # fmt: skip
    assert epoch_line(row, 40) == (
        "epoch 3/40  loss 0.4123 (ce 0.04123 kd 0.3711)  train 91.20%  test 88.40% (top-5 99.10%)  lr 0.05  5123 img/s"
    )
    single = {k: v for k, v in row.items() if k not in ("train_kd", "test_top5")}
    assert "(ce" not in epoch_line(single, 40)  # one term is the loss itself


@pytest.mark.usefixtures("one_thread")
def test_distill_epoch_lines_and_demo_teacher_progress(teacher_run: Path, tmp_path: Path) -> None:
    from kdlab.config import load_config
    from kdlab.engine import run

    lines: list[str] = []
    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml", SMALL + ["train.epochs=1", f"teacher.checkpoint={teacher_run}"])
    run(cfg, tmp_path / "kd", log=lines.append)
    epoch = [line for line in lines if line.startswith("epoch 1/1")]
    assert len(epoch) == 1 and " (ce " in epoch[0] and " kd " in epoch[0]

    from kdlab.demo import run_demo

    demo_log: list[str] = []
    run_demo(tmp_path / "demo", seeds=1, teacher_epochs=2, student_epochs=1, log=demo_log.append,
             recipes={"CE": "student_ce.yaml"})  # fmt: skip
    assert [line.split("  ")[0] for line in demo_log if line.startswith("[demo] teacher epoch")] == [
        "[demo] teacher epoch 1/2", "[demo] teacher epoch 2/2"
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_only_rank0_prints_and_logs(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "kdlab", "train", str(CONFIGS / "mnist1d" / "student_ce.yaml"),
           "--out", str(out), "data.num_samples=600", "train.epochs=2", "train.batch_size=100", "train.threads=1",
           "train.progress=true", "logging.tensorboard=true"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["world_size"] == 2  # one summary: stdout is exactly one JSON document
    err = res.stderr.replace("\r", "\n")
    assert [line.split("  ")[0] for line in err.splitlines() if "img/s" in line and line.startswith("epoch")] == [
        "epoch 1/2", "epoch 2/2"
    ]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("epoch", [3, 0, -1])  # -1, 0: a method's pre-phase epochs
def test_the_epoch_line_pattern_finds_what_epoch_line_writes(epoch):
    """The Slurm launcher tells an attempt that made progress from one that did not by EPOCH_LINE in the task's log;
    it must keep matching what epoch_line prints (and not the progress bar's ``epoch 3/40:`` description)."""
    from kdlab.engine.progress import EPOCH_LINE, epoch_line

    row = {"epoch": epoch, "train_loss": 0.41, "train_acc": 91.2, "test_acc": 88.4, "test_top5": 99.0, "lr": 0.05,
           "images_per_s": 5123.0}  # fmt: skip
    log = f"starting /runs/x\n{epoch_line(row, 40)}\n"
    assert EPOCH_LINE.search(log) and not EPOCH_LINE.search("starting /runs/x\nepoch 3/40:  12%|#2  |\n")
