"""kdlab.launch without a cluster: the local launcher (order, skips, failures, records, status), the Slurm request a
launcher section makes, time-limit parsing and the srun rendezvous taken from Slurm's environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kdlab.config import LauncherConfig, slurm_minutes
from kdlab.engine.distributed import first_host, slurm_rendezvous
from kdlab.errors import KdlabError
from kdlab.launch import LaunchTask, get_launcher
from kdlab.launch.status import task_statuses


def _py(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_local_launcher_order_failure_skip_and_status(tmp_path):
    folder = tmp_path / "launch"
    stamp = tmp_path / "stamps"
    stamp.mkdir()
    write = "import pathlib,time; pathlib.Path(r'{}').write_text(str(time.time()))"
    tasks = [
        LaunchTask("teacher", _py(write.format(stamp / "teacher")), tmp_path / "t.log"),
        LaunchTask("bad", _py("import sys; print('kdlab: error: boom'); sys.exit(2)"), tmp_path / "b.log"),
        LaunchTask("student", _py(write.format(stamp / "student")), tmp_path / "s.log", after=("teacher",)),
        LaunchTask("orphan", _py("print(1)"), tmp_path / "o.log", after=("bad",)),
        LaunchTask("tables", _py("print(2)"), tmp_path / "x.log", after=("student", "orphan"), after_any=True),
    ]
    ends = get_launcher("local", jobs=2).submit(tasks, folder).wait()
    assert {n: e.state for n, e in ends.items()} == {
        "teacher": "done", "bad": "failed", "student": "done", "orphan": "skipped", "tables": "done"}  # fmt: skip
    assert ends["bad"].error == "boom" and ends["orphan"].error == "bad did not succeed"
    assert float((stamp / "student").read_text()) >= float((stamp / "teacher").read_text())
    status, _ = task_statuses(folder)
    assert {n: s.state for n, s in status.items()} == {
        "teacher": "done", "bad": "failed", "student": "done", "orphan": "cancelled", "tables": "done"}  # fmt: skip
    assert status["bad"].detail == "boom" and "bad did not succeed" in status["orphan"].detail


@pytest.mark.parametrize("tasks, message", [
    ([LaunchTask("a/b", ("true",), Path("l"))], "must be letters"),
    ([LaunchTask("a", ("true",), Path("l")), LaunchTask("a", ("true",), Path("l"))], "two tasks are named 'a'"),
    ([LaunchTask("a", ("true",), Path("l"), after=("b",))], "waits for 'b', which is not an earlier task"),
])  # fmt: skip
def test_tasks_are_checked_before_anything_starts(tmp_path, tasks, message):
    with pytest.raises(KdlabError, match=message):
        get_launcher("local").submit(tasks, tmp_path / "launch")
    assert not (tmp_path / "launch").exists()


def test_slurm_request_of_a_launcher_section():
    pytest.importorskip("submitit")
    from kdlab.launch.slurm import executor_parameters

    s = LauncherConfig(name="slurm", partition="gpu", time="1-02:00:00", nodes=2, gpus_per_node=4, mem_gb=64,
                       account="lab", setup=["module load cuda"], additional={"exclude": "n1"})  # fmt: skip
    p = executor_parameters(s, "kdlab:x", "afterok:12_0:13")
    assert p["time"] == 26 * 60 and p["partition"] == "gpu" and p["nodes"] == 2 and p["gpus_per_node"] == 4
    assert p["ntasks_per_node"] == 4 and p["mem"] == "65536M" and p["account"] == "lab"
    assert p["setup"] == ["module load cuda"] and p["signal_delay_s"] == 120
    assert p["additional_parameters"] == {"requeue": True, "dependency": "afterok:12_0:13", "kill-on-invalid-dep": "yes",
                                          "exclude": "n1"}  # fmt: skip
    with pytest.raises(KdlabError, match="--jobs runs local worker processes"):
        get_launcher(s, jobs=3)


@pytest.mark.parametrize(("time", "delay", "asked"), [(None, 120, 120), ("1-02:00:00", 120, 120), (10, 120, 120),
                                                      (2, 120, 40), (1, 120, 20), ("00:00:30", 120, 20),
                                                      (1, 10, 10)])  # fmt: skip
def test_the_requeue_signal_leaves_a_short_limit_time_to_run(time, delay, asked):
    """Slurm sends the signal up to 30 s early: the default 120 s with a 1-minute limit would stop every attempt
    before its first epoch (requeues without progress), so the delay asked is at most a third of the limit."""
    pytest.importorskip("submitit")
    from kdlab.launch.slurm import executor_parameters

    s = LauncherConfig(name="slurm", time=time, signal_delay_s=delay)
    assert s.requeue_signal_s == asked and executor_parameters(s, "kdlab:x")["signal_delay_s"] == asked


@pytest.mark.parametrize("text, minutes", [(90, 90), ("90", 90), ("1:30", 2), ("4:00:00", 240), ("1-0", 1440),
                                           ("1-2:30", 1590), ("2-00:00:01", 2881)])  # fmt: skip
def test_slurm_time_formats(text, minutes):
    assert slurm_minutes(text) == minutes


@pytest.mark.parametrize("bad", ["4h", "0", "-5", "1:2:3:4", True])
def test_malformed_slurm_times_are_refused(bad):
    with pytest.raises(ValueError):
        slurm_minutes(bad)


def test_rendezvous_from_an_srun_step_only():
    step = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NODELIST": "gpu[07-08]"}  # fmt: skip
    assert slurm_rendezvous(step) == {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                                      "MASTER_PORT": str(20000 + 4242)}  # fmt: skip
    assert slurm_rendezvous({**step, "WORLD_SIZE": "2"}) == {}  # torchrun's variables win
    assert slurm_rendezvous({**step, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # one task
    assert slurm_rendezvous({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) == {}  # a batch script, not a step
    assert first_host("a[1-2,5]-ib,b3") == "a1-ib" and first_host("node7") == "node7"


def test_a_second_writer_of_a_run_folder_is_refused(tmp_path):
    """A resubmitted or requeued task whose run is still being written elsewhere stops at the folder lock."""
    import subprocess

    from conftest import CONFIGS, SMALL

    from kdlab.config import load_config
    from kdlab.engine.rundir import FolderLock
    from kdlab.pipelines.runner import write_job

    cfg = load_config(CONFIGS / "mnist1d" / "teacher_cnn.yaml", SMALL)
    run = tmp_path / "run"
    argv = write_job(tmp_path / "job.json", cfg, run, tmp_path, "plan")
    with FolderLock(run):
        res = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "is writing to" in res.stderr, res.stderr
    assert not (run / "config.yaml").exists()


@pytest.mark.parametrize("field, value", [("setup", ["module load cuda"]), ("python", "/opt/py/bin/python3")])
def test_shell_text_from_a_config_needs_trust(tmp_path, field, value):
    """launcher.setup / launcher.python run on the cluster: a recipe from someone else must not run them unasked."""
    from kdlab.launch.slurm import SlurmLauncher
    from kdlab.trust import UntrustedCodeError, trusting

    marker = tmp_path / "ran"
    launcher = SlurmLauncher(LauncherConfig(name="slurm", **{field: value}))
    task = LaunchTask(name="a", argv=("touch", str(marker)), log=tmp_path / "a.log")
    with trusting(False), pytest.raises(UntrustedCodeError, match=f"launcher.{field} .*--trust-code"):
        launcher.check([task])
    assert not marker.exists()


@pytest.mark.parametrize("kw", [{"additional": {"comment": "x\nrm -rf ~"}}, {"partition": "gpu\necho pwned"},
                                {"setup": ["module load a\necho b"]}, {"account": "lab\r"}])  # fmt: skip
def test_launcher_values_are_one_line(kw):
    """Each value lands on an #SBATCH line: a line break would add a shell line to the job script."""
    with pytest.raises(ValueError, match="must be one line"):
        LauncherConfig(name="slurm", **kw)


@pytest.mark.parametrize(
    ("prints", "after_s", "stalls", "requeued_with"),
    [
        ("starting", 0.0, 1, None),  # a second attempt in a row without an epoch at the limit: not requeued
        ("starting", 0.0, 0, 1),  # the first: requeued, counted
        ("epoch 1/30  loss 1.3822", 0.0, 1, 0),  # an epoch finished: requeued, the count starts again
        ("starting", 3600.0, 1, 0),  # stopped well before the limit (a preemption): requeued, not counted
    ],
)
def test_a_time_limit_too_short_for_one_epoch_ends_the_requeues(tmp_path, prints, after_s, stalls, requeued_with):
    """A job whose attempts reach the time limit before an epoch finishes would be requeued without progress until
    launcher.max_timeouts: the second such attempt in a row ends it, saying why in the task's log."""
    pytest.importorskip("submitit")
    import signal
    import threading
    import time

    from kdlab.launch.slurm import SlurmTask

    log = tmp_path / "run.log"
    code = f"import time; print({prints!r}, flush=True); time.sleep(120)"
    task = SlurmTask("run", _py(code), str(log), str(tmp_path / "launch"), {}, stop_s=5.0, timeout_after_s=after_s,
                     stalls=stalls)  # fmt: skip
    got: list = []

    class Requeue(Exception):  # what submitit does after the checkpoint: requeue or end, leaving the task's call
        pass

    def on_signal(signum, frame):  # as submitit: the requeue signal's handler runs in the task's (main) thread
        got.append(task.checkpoint())
        raise Requeue

    def send_once_printed() -> None:
        deadline = time.monotonic() + 60
        while prints not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR2)

    old = signal.signal(signal.SIGUSR2, on_signal)
    try:
        threading.Thread(target=send_once_printed, daemon=True).start()
        with pytest.raises(Requeue):
            task()
    finally:
        signal.signal(signal.SIGUSR2, old)
    (delayed,) = got
    from kdlab.launch import records

    records.record_submission(tmp_path / "launch", "local", "run", log, [], None)  # the status read without a queue
    statuses, _ = task_statuses(tmp_path / "launch")
    if requeued_with is None:
        assert delayed is None
        assert "kdlab: error: not requeued: 2 attempts in a row reached the time limit" in log.read_text()
        assert statuses["run"].state == "failed" and "raise launcher.time" in statuses["run"].detail
    else:
        assert delayed.function.stalls == requeued_with and delayed.function.timeout_after_s == after_s
        assert statuses["run"].state == "cancelled"  # stopped resumably, to be requeued
