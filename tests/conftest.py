"""Shared fixtures: a session-wide MNIST-1D cache, small recipes, and a CLI runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "kdlab" / "configs"


@pytest.fixture(scope="session", autouse=True)
def _mnist1d_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generate MNIST-1D once per test session into a private cache folder."""
    cache = tmp_path_factory.mktemp("kdlab_cache")
    os.environ["KDLAB_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (restored afterwards)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = [
    "data.num_samples=1000",  # 800 train / 200 test
    "train.epochs=2",
    "train.batch_size=50",
    "train.progress=false",
    "train.threads=1",
]


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def cli():
    """Run ``kdlab`` in-process; returns (exit code, stdout, stderr)."""
    from kdlab.cli import main
    from kdlab.trust import set_trust

    def run(*args: str, capsys=None):
        try:
            return main([str(a) for a in args])
        finally:
            set_trust(None)  # --trust-code holds for that command only

    return run


def run_kdlab(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m kdlab`` in a subprocess (exit codes and output exactly as a user sees them)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "kdlab", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, **kw
    )


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, _mnist1d_cache) -> Path:
    """A small trained MNIST-1D CNN teacher run directory (shared by the distillation tests)."""
    from kdlab.config import load_config
    from kdlab.engine import run

    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(CONFIGS / "mnist1d" / "teacher_cnn.yaml", SMALL + ["train.epochs=3"])
    run(cfg, out)
    return out


@pytest.fixture
def no_hang():
    """If a reader regresses, the test fails instead of taking CI down with it: a read that blocks (a FIFO opened the
    plain way) is stopped after 60 s, and the process may not grow by more than 2 GiB (reading /dev/zero whole would
    fill the machine's memory — the 22.9 GiB of the issue — before failing)."""
    import resource

    def hung(signum, frame):
        raise TimeoutError("blocked on a file")

    status = Path("/proc/self/status").read_text()
    data_kib = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmData:")))
    limits = resource.getrlimit(resource.RLIMIT_DATA)
    resource.setrlimit(resource.RLIMIT_DATA, (data_kib * 1024 + (2 << 30), limits[1]))
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_DATA, limits)


INIT_FUNCTIONS = ("kaiming_uniform_", "kaiming_normal_", "uniform_", "normal_", "xavier_uniform_", "xavier_normal_",
                  "trunc_normal_", "orthogonal_")


def _zero_fill(t, *a, **k):
    import torch

    with torch.no_grad():
        return t.zero_()


def skip_weight_init() -> None:
    """Replace random weight initialisation by zeros (≈ half the cost of building the zoo's models on CPU, and no
    uninitialised memory whose denormals slow the forward passes down): a dry run checks that recipes build and fit
    together, not the values of the initial weights."""
    import torch

    for name in INIT_FUNCTIONS:
        setattr(torch.nn.init, name, _zero_fill)


@pytest.fixture
def no_weight_init(monkeypatch):
    """``skip_weight_init`` for one test."""
    import torch

    for name in INIT_FUNCTIONS:
        monkeypatch.setattr(torch.nn.init, name, _zero_fill)


def _dry_run_in_worker(args: list[str]) -> tuple[int, str, str]:
    """One ``kdlab … --dry-run`` in a pool worker: exit code, stdout, stderr."""
    import contextlib
    import io

    from kdlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def dry_runs_in_two_workers(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run many ``kdlab`` commands (dry runs, each single-threaded) in two spawned worker processes whose weight
    initialisation is zero-filled: CI's two cores, about half the wall time of one process. The workers inherit this
    process's environment."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2, initializer=skip_weight_init) as pool:
        return pool.map(_dry_run_in_worker, commands, chunksize=4)
