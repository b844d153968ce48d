"""Submission overhead per run and status latency of a 100-run plan on a Slurm cluster (`--launcher slurm`).

Needs a running cluster (``eval "$(scripts/slurm/start.sh)"``). The runs are submitted on hold
(``launcher.additional={hold: true}``), so nothing trains; they are cancelled at the end. Prints the median of
``--rounds`` rounds: the time of ``kdlab sweep --launcher slurm`` for a 1-run and an N-run plan (the difference over
N − 1 is the overhead per run), of ``kdlab sweep --status`` on the N-run plan, and of ``kdlab sweep --cancel``.

    python benchmarks/slurm_overhead.py --runs 100 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "src" / "kdlab" / "configs" / "mnist1d" / "teacher_cnn.yaml"
HOLD = ["--launcher", "slurm", "launcher.additional={hold: true}"]


def timed(*args: str) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "kdlab", *args], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode not in (0, 1):
        raise SystemExit(f"kdlab {' '.join(args[:3])} … failed: {res.stderr.strip()[-500:]}")
    return dt


def plan(out: Path, runs: int) -> list[str]:
    seeds = max(1, runs // 10)
    lrs = ",".join(f"0.{i + 1:02d}" for i in range(runs // seeds))
    return ["sweep", str(RECIPE), "--grid", f"optim.lr={lrs}", "--seeds", str(seeds), "--out", str(out)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    one, many, status, cancel = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            o1, on = Path(tmp) / f"one{r}", Path(tmp) / f"many{r}"
            one.append(timed(*plan(o1, 1), *HOLD))
            many.append(timed(*plan(on, a.runs), *HOLD))
            status.append(timed("sweep", "--status", str(on)))
            cancel.append(timed("sweep", "--cancel", str(on)))
            timed("sweep", "--cancel", str(o1))
    m1, mn = statistics.median(one), statistics.median(many)
    print(f"submit 1 run: {m1:.2f} s; submit {a.runs} runs: {mn:.2f} s -> {(mn - m1) / (a.runs - 1) * 1000:.0f} ms per "
          f"extra run (median of {a.rounds})")
    print(f"--status of {a.runs} queued runs: {statistics.median(status):.2f} s; --cancel: {statistics.median(cancel):.2f} s")


if __name__ == "__main__":
    main()
