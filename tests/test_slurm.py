"""kdlab on a real Slurm cluster (scripts/slurm/start.sh: slurmctld + slurmd on this machine), through submitit.

Every scenario is submitted when the module starts, so the jobs run side by side while the local reference runs are
computed here: a 2×2 sweep with one job requeued mid-run (``scontrol requeue``) equals the local sweep run for run;
a run hitting its time limit (shortened by ``scontrol update`` once the run has a checkpoint, the run frozen
until the limit's signal reaches it: Slurm sends that signal on a 30 s timer, too early or too late for a fixed limit
on a loaded machine) is requeued and ends bit-identical to an uninterrupted run; a teacher → student chain
keeps its order and ``--status`` shows pending, running, done, failed and cancelled runs; a 2-task srun run equals
the 1-process run with ``train.sync_bn=true``; bad input is one line, exit 2, nothing submitted.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from _slurm_cluster import slurm_cluster  # noqa: F401  (fixture)
from conftest import CONFIGS

pytestmark = pytest.mark.slow

TEACHER = CONFIGS / "mnist1d" / "teacher_cnn.yaml"
STUDENT = CONFIGS / "mnist1d" / "student_kd.yaml"
COMMON = ["train.batch_size=50", "train.threads=1", "train.progress=false"]
SWEEP = ["data.num_samples=2000", "train.epochs=10", *COMMON]  # ~1 s an epoch: time to requeue one mid-run
LONG = ["data.num_samples=4000", "train.epochs=30", *COMMON]  # ~15 s; frozen by the test until its time-limit signal
SMALL = ["data.num_samples=1000", "train.epochs=2", *COMMON]
GRID = ["--grid", "optim.lr=0.05,0.1", "--seeds", "2"]


def kdlab(*args: object, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, "-m", "kdlab", *map(str, args)], capture_output=True, text=True,
                         timeout=300, env=env)  # fmt: skip
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def wait_for(what: str, cond, timeout: float = 400, every: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def queued(name: str) -> list[str]:
    """Job ids in the queue whose job name is ``name``."""
    out = subprocess.run(["squeue", "--noheader", "--array", f"--name={name}", "--format=%i"], capture_output=True,
                         text=True).stdout  # fmt: skip
    return out.split()


def epochs_done(run: Path) -> int:
    m = run / "metrics.jsonl"
    return len([ln for ln in m.read_text().splitlines() if ln.strip()]) if m.is_file() else 0


def job_of(folder: Path, task: str) -> str:
    return json.loads((folder / ".kdlab-launch" / "tasks" / f"{task}.json").read_text())["jobs"][-1]


def weights(run: Path) -> bytes:
    return (run / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def submitted(slurm_cluster, tmp_path_factory):  # noqa: F811
    """Submit every scenario at once (they run side by side); returns their folders."""
    from kdlab.config import load_config
    from kdlab.data import build_dataset

    for n in (1000, 2000, 4000):  # MNIST-1D generated once here, not by concurrent jobs
        build_dataset(load_config(TEACHER, [f"data.num_samples={n}"]).data)
    base = tmp_path_factory.mktemp("slurm")
    spec = base / "chain.yaml"
    spec.write_text(yaml.safe_dump({"stages": [
        {"name": "teacher", "recipe": str(TEACHER), "grid": {"optim.lr": [0.05, 1.0e30]},  # 1e30: non-finite loss
         "overrides": {"data.num_samples": 1000, "train.epochs": 3, "train.batch_size": 50, "train.threads": 1}},
        {"name": "student", "recipe": str(STUDENT),
         "overrides": {"data.num_samples": 1000, "train.epochs": 2, "train.batch_size": 50, "train.threads": 1}},
        {"name": "slow", "recipe": str(STUDENT),  # cancelled by the test once it runs
         "overrides": {"data.num_samples": 4000, "train.epochs": 200, "train.batch_size": 50, "train.threads": 1}},
    ]}))  # fmt: skip
    d = {k: base / k for k in ("sweep", "limit", "chain", "ddp")}
    first = d["sweep"] / "optim.lr=0.05" / "seed_0"
    requeued: dict[str, object] = {}

    def requeue_first_run() -> None:  # `scontrol requeue` once the run is past its first epoch (before its last)
        try:
            wait_for("epoch 1 of the first sweep run", lambda: epochs_done(first) >= 1, every=0.2)
            if not (first / "summary.json").exists():
                job = job_of(d["sweep"], "optim.lr=0.05__seed_0")
                subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True)
                requeued.update(job=job, epoch=epochs_done(first))
        except Exception as err:  # reported by the test
            requeued["error"] = repr(err)

    limited: dict[str, object] = {}

    def hit_the_time_limit_mid_run() -> None:
        """Once the run has a checkpoint: freeze it (SIGSTOP), shorten its job's time limit so that the warning
        signal is due at once (Slurm sends it at its next 30 s check, ``signal_delay_s`` before the limit), let the
        run go on (SIGCONT) once the signal reaches it, and give the job back its 10 minutes for the
        requeued attempt. The limit is ``E + 60`` s rounded up to a minute (``E``: the job's elapsed time): the signal
        comes at most 30 s later and the 30 s stop (``signal_delay_s / 3``) still ends before the kill."""
        run, pid = d["limit"], 0
        try:
            # epoch 2 in metrics.jsonl: epoch 1's checkpoint is complete (each epoch's line precedes its checkpoint)
            wait_for("epoch 2 of the time-limited run", lambda: epochs_done(run) >= 2, every=0.2)
            (state,) = (run / ".kdlab-launch" / "tasks").glob("*.state.json")
            pid, job = json.loads(state.read_text())["pid"], job_of(run, state.name[: -len(".state.json")])
            os.kill(pid, signal.SIGSTOP)
            limited.update(job=job, epoch=epochs_done(run))
            info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
            h, m, sec = map(int, re.search(r"RunTime=(\d+):(\d+):(\d+)", info).groups())
            limit = -(-(h * 3600 + m * 60 + sec + 60) // 60)
            subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], check=True, capture_output=True)

            def signalled() -> bool:  # the warning reached the run: a stop signal pending (a hex mask with bit
                # signal - 1), or the run gone already (slurmstepd may send SIGCONT with the signals it delivers)
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except FileNotFoundError:
                    return True
                mask = int(re.search(r"ShdPnd:\s*([0-9a-f]+)", status).group(1), 16)
                stops = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR2 - 1))
                return bool(mask & stops) or re.search(r"State:\s*[ZX]", status) is not None

            wait_for("the time limit's signal", signalled, timeout=120, every=0.1)
            restore = ["scontrol", "update", f"JobId={job}", "TimeLimit=10"]  # retried while the job is completing
            wait_for("the restored time limit", lambda: subprocess.run(restore, capture_output=True).returncode == 0)
            limited["limit_min"] = limit
        except Exception as err:  # reported by the test
            limited["error"] = repr(err)
        finally:
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)

    chain_seen: dict[str, set[str]] = {}
    chain_lines: list[str] = []

    def watch_and_cancel_chain() -> None:  # --status every half second; --cancel once the slow stage runs
        from kdlab.pipelines import plan_status

        def slow_running() -> bool:
            if (d["chain"] / "plan.json").is_file():
                for r in plan_status(d["chain"]).runs:
                    chain_seen.setdefault(r.run, set()).add(r.state)
                    chain_lines.append(f"{r.run} {r.state} {r.detail} on {r.node}")
            return epochs_done(d["chain"] / "slow" / "optim.lr=0.05" / "seed_0") >= 1

        try:
            wait_for("the slow stage to run", slow_running)
            chain_seen["cancel"] = {kdlab("chain", "--cancel", d["chain"]).stdout}
        except Exception as err:
            chain_seen["error"] = {repr(err)}

    watcher = threading.Thread(target=requeue_first_run, daemon=True)
    watcher.start()
    chain_watcher = threading.Thread(target=watch_and_cancel_chain, daemon=True)
    chain_watcher.start()
    limit_watcher = threading.Thread(target=hit_the_time_limit_mid_run, daemon=True)
    limit_watcher.start()
    commands = {
        "sweep": ["sweep", TEACHER, *SWEEP, *GRID, "--out", d["sweep"], "--launcher", "slurm"],
        "limit": ["train", TEACHER, *LONG, "--out", d["limit"], "--launcher", "slurm", "launcher.time=10",
                  "launcher.signal_delay_s=90"],
        "chain": ["chain", spec, "--out", d["chain"], "--launcher", "slurm"],
        "ddp": ["train", TEACHER, *SMALL, "train.sync_bn=true", "--out", d["ddp"], "--launcher", "slurm",
                "launcher.tasks_per_node=2"],
    }  # fmt: skip
    procs = {k: subprocess.Popen([sys.executable, "-m", "kdlab", *map(str, c)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, c in commands.items()}  # fmt: skip
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (k, err[-2000:])
    d["base"], d["watcher"], d["requeued"] = base, watcher, requeued
    d["chain_watcher"], d["chain_seen"], d["chain_lines"] = chain_watcher, chain_seen, chain_lines
    d["limit_watcher"], d["limited"] = limit_watcher, limited
    yield d
    from kdlab.pipelines import cancel_plan

    for k in commands:  # leave nothing running behind (e.g. when only some of the tests ran)
        cancel_plan(d[k])


def test_sweep_with_a_requeued_job_equals_the_local_sweep(submitted, cli, one_thread, tmp_path):
    out = submitted["sweep"]
    submitted["watcher"].join(timeout=400)
    requeued = submitted["requeued"]
    assert "job" in requeued, f"the first run was not requeued mid-run: {requeued}"
    local = tmp_path / "local"
    assert cli("sweep", TEACHER, *SWEEP, *GRID, "--out", local) == 0  # meanwhile, here
    wait_for("the tables job", lambda: (out / "logs" / "tables.log").exists() and not queued(f"kdlab:{out.name}"))
    log = (out / "logs" / "optim.lr=0.05__seed_0.log").read_text()
    assert "attempt 2" in log and "kdlab: terminated" in log, log
    resumed = int(re.search(r"resuming \S+ after epoch (\d+)", log).group(1))
    assert 1 <= resumed < 10 and resumed >= requeued["epoch"] - 1
    for seed_dir in sorted(local.glob("optim.lr=*/seed_*")):
        rel = seed_dir.relative_to(local)
        a, b = (json.loads((root / rel / "summary.json").read_text()) for root in (local, out))
        for key in ("final_test_acc", "best_test_acc", "best_test_top5", "best_epoch", "seed"):
            assert a[key] == b[key], (rel, key)
        assert weights(seed_dir) == weights(out / rel), rel
        assert (seed_dir / "train_eval.json").read_text() == (out / rel / "train_eval.json").read_text()
    def table(root: Path) -> list[dict]:  # results.csv without the wall-time columns
        rows = list(csv.DictReader((root / "results.csv").read_text().splitlines()))
        return [{k: v for k, v in r.items() if not k.startswith("wall_time")} for r in rows]

    assert table(local) == table(out)
    status = kdlab("sweep", "--status", out)
    assert status.stdout.count(" done ") == 5, status.stdout  # 4 runs and the tables job
    again = kdlab("sweep", TEACHER, *SWEEP, *GRID, "--out", out, "--launcher", "slurm")  # finished runs: skipped
    assert "4 finished, 0 to resume, 0 new" in again.stderr and not queued(f"kdlab:{out.name}"), again.stderr


def test_time_limit_requeues_and_ends_bit_identical(submitted, cli, one_thread, tmp_path):
    out = submitted["limit"]
    ref = tmp_path / "ref"
    assert cli("train", TEACHER, *LONG, "--out", ref, "--quiet") == 0  # the uninterrupted run, meanwhile
    submitted["limit_watcher"].join(timeout=400)
    limited = submitted["limited"]
    assert "limit_min" in limited and "error" not in limited, f"the time limit was not hit mid-run: {limited}"
    wait_for("the time-limited run", lambda: (out / "summary.json").exists() and not queued(f"kdlab:{out.name}"))
    log = (out / ".kdlab-launch" / "run.log").read_text()
    assert "attempt 2" in log and "Traceback" not in log, log
    resumed = int(re.search(r"resuming \S+ after epoch (\d+)", log).group(1))
    assert resumed >= limited["epoch"] - 1 >= 1, (resumed, limited)  # its last checkpoint when frozen
    sub = "\n".join(p.read_text() for p in (out / ".kdlab-launch" / "slurm").glob("*_log.out"))
    assert "timed-out" in sub and "Requeued job" in sub, sub[-2000:]
    assert weights(out) == weights(ref)
    a, b = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (ref, out))
    assert a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"]
    status = kdlab("sweep", "--status", out)  # a single run folder
    assert re.search(r" done +top-1 \d+\.\d+% +top-5", status.stdout) and "job " in status.stdout, status.stdout


def test_chain_order_status_of_every_state_and_cancel(submitted):
    out = submitted["chain"]
    submitted["chain_watcher"].join(timeout=400)
    seen, details = submitted["chain_seen"], submitted["chain_lines"]
    assert "error" not in seen, seen
    assert "scancel" in next(iter(seen["cancel"]))
    wait_for("the chain's jobs to leave the queue", lambda: not queued(f"kdlab:{out.name}"))
    final = kdlab("chain", "--status", out, check=False)
    assert final.returncode == 1, final.stdout  # a run failed
    lines = {ln.split()[0]: ln for ln in final.stdout.splitlines()[1:] if ln.strip() and "/" in ln.split()[0]}
    good, bad = "optim.lr=0.05/seed_0", "optim.lr=1e+30/seed_0"
    assert re.search(r" done +top-1 \d+\.\d+% +top-5 \d+\.\d+%", lines[f"teacher/{good}"])
    assert " done " in lines[f"student/{good}"]
    assert " failed " in lines[f"teacher/{bad}"] and "non-finite loss" in lines[f"teacher/{bad}"]
    assert "logs/teacher__optim.lr=1e+30__seed_0.log" in lines[f"teacher/{bad}"]
    for run in (f"student/{bad}", f"slow/{bad}", f"slow/{good}"):
        assert " cancelled " in lines[run], lines[run]
    assert "pending" in seen[f"student/{good}"] or "pending" in seen[f"slow/{good}"], seen
    assert any(re.search(r"^slow/\S+ running epoch \d+ of 200 on \S+", d) for d in details), details[-20:]
    # teachers before students: each student job started after its teacher's job ended
    recs = out / ".kdlab-launch" / "tasks"
    state = {p.name[: -len(".state.json")]: json.loads(p.read_text()) for p in recs.glob("*.state.json")}
    t, s = state[f"teacher__{good.replace('/', '__')}"], state[f"student__{good.replace('/', '__')}"]
    assert s["started"] >= t["ended"]
    cfg = yaml.safe_load((out / "student" / good / "config.yaml").read_text())
    assert cfg["teacher"]["checkpoint"] == str(out / "teacher" / good)


def test_two_srun_tasks_equal_one_process_with_sync_bn(submitted, cli, one_thread, tmp_path):
    out = submitted["ddp"]
    ref = tmp_path / "ref"
    assert cli("train", TEACHER, *SMALL, "train.sync_bn=true", "--out", ref, "--quiet") == 0
    wait_for("the 2-task run", lambda: (out / "summary.json").exists() and not queued(f"kdlab:{out.name}"))
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert (out / ".kdlab-launch" / "run.log.rank1").is_file()
    from safetensors.torch import load_file

    a, b = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (ref, out))
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=0.51)
    wa, wb = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa) < 1e-4


def _chain_with_bad_partition(t: Path) -> list:
    spec = t / "bad_chain.yaml"
    spec.write_text(yaml.safe_dump({"stages": [
        {"name": "teacher", "recipe": str(TEACHER), "overrides": {"data.num_samples": 1000}},
        {"name": "student", "recipe": str(STUDENT), "overrides": {"launcher.partition": "nope"}},
    ]}))  # fmt: skip
    return ["chain", spec, "--launcher", "slurm"]


BAD = {
    "slurm not installed": (lambda t: ["sweep", TEACHER, "--launcher", "slurm"], "Slurm is not installed here (sbatch is not on PATH)"),
    "unknown partition": (lambda t: ["sweep", TEACHER, *GRID, "--launcher", "slurm", "launcher.partition=nope"],
                          "sbatch refused the request (partition=nope): invalid partition specified: nope"),
    "time over the partition's limit": (lambda t: ["train", TEACHER, "--launcher", "slurm", "launcher.partition=short",
                                                   "launcher.time=10"], "Requested time limit is invalid"),
    "a later stage refused: nothing of the chain submitted": (_chain_with_bad_partition, "invalid partition specified: nope"),
    "--launcher slurm with --jobs": (lambda t: ["sweep", TEACHER, "--launcher", "slurm", "--jobs", "2"],
                                     "--jobs runs local worker processes; with --launcher slurm every run is a job"),
    "unknown launcher": (lambda t: ["sweep", TEACHER, "--launcher", "slrum"], "unknown launcher 'slrum' (did you mean 'slurm'?)"),
    "malformed time": (lambda t: ["train", TEACHER, "--launcher", "slurm", "launcher.time=4h"], "launcher.time: time must be minutes"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2_nothing_submitted(case, slurm_cluster, tmp_path, cli, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    if case == "slurm not installed":
        monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    capsys.readouterr()
    code = cli(*BAD[case][0](tmp_path), "--out", out)
    err = capsys.readouterr().err.strip().splitlines()
    monkeypatch.undo()
    assert code == 2 and len(err) == 1 and err[0].startswith("kdlab: error: "), err
    assert BAD[case][1] in err[0], err
    assert not out.exists()
    assert not queued(f"kdlab:{out.name}")  # nothing submitted
