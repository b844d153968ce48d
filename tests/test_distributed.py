"""torchrun scale-out on CPU (gloo): 2 processes follow the 1-process loss trajectory; resume works under DDP."""

import json
import os
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import CONFIGS

ARGS = [str(CONFIGS / "mnist1d" / "student_ce.yaml"), "--quiet", "data.num_samples=1000", "train.batch_size=64",
        "train.threads=1", "seed=3", "schedule.name=constant"]  # fmt: skip
TOL = 1e-5  # float32 all-reduce order vs a single process: agreement to ~1e-6 relative was measured


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "kdlab", *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume(tmp_path):
    single = tmp_path / "single"
    res = subprocess.run([sys.executable, "-m", "kdlab", "train", *ARGS, "train.epochs=3", "--out", str(single)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    ddp = tmp_path / "ddp"
    res = _torchrun("train", *ARGS, "train.epochs=2", "--out", str(ddp))
    assert res.returncode == 0, res.stderr[-2000:]
    res = _torchrun("train", "--resume", "--out", str(ddp), "train.epochs=3", "--quiet")  # resume under DDP
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _losses(single), _losses(ddp)
    assert [r["epoch"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=TOL)
        assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=0.51)  # at most one of 200 test samples flips
    wa, wb = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert diff < 1e-4
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2
    print(f"max |w_ddp - w_single| = {diff:.2e}; losses {[r['train_loss'] for r in a]} vs {[r['train_loss'] for r in b]}")
