"""Asking Slurm about jobs: what is queued or running (squeue), how ended jobs ended (sacct, else scontrol).

Nothing here needs submitit: ``kdlab sweep --status`` and ``--cancel`` work wherever the Slurm client commands do.
Without an accounting database (no slurmdbd) ``sacct`` refuses; then the controller still remembers a job for
``MinJobAge`` seconds after it ended (``scontrol show job``), and after that only the launch records tell.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from kdlab.errors import KdlabError

#: squeue states of a job that has not ended (a requeued job is PENDING again)
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}  # fmt: skip
TIMEOUT_S = 60


@dataclass(frozen=True)
class QueueEntry:
    state: str  # squeue's %T, e.g. PENDING, RUNNING
    nodes: str = ""
    reason: str = ""


def require_slurm(command: str = "sbatch") -> str:
    """The path of a Slurm client command, or a one-line error saying Slurm is not installed here."""
    path = shutil.which(command)
    if path is None:
        raise KdlabError(
            f"--launcher slurm: Slurm is not installed here ({command} is not on PATH); use a machine of the cluster "
            "or --launcher local"
        )
    return path


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    require_slurm(argv[0])
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise KdlabError(f"{argv[0]} did not answer within {TIMEOUT_S} s (is slurmctld up?)") from None
    if check and res.returncode != 0:
        raise KdlabError(f"{argv[0]} failed: {one_line(res.stderr or res.stdout)}")
    return res


def one_line(text: str) -> str:
    """Slurm's message without its ``sbatch: error:`` prefixes, on one line."""
    lines = [re.sub(r"^\w+: (error: )?", "", ln).strip() for ln in text.strip().splitlines() if ln.strip()]
    return "; ".join(lines)[:400] or "no message"


def base_ids(job_ids: list[str]) -> list[str]:
    """``123_4`` → ``123`` (squeue -j takes array ids), unique, in order."""
    out: list[str] = []
    for j in job_ids:
        b = j.split("_", 1)[0]
        if b not in out:
            out.append(b)
    return out


def queue(job_ids: list[str]) -> dict[str, QueueEntry]:
    """The jobs among ``job_ids`` that are still in the queue (array tasks one by one, as ``123_4``)."""
    if not job_ids:
        return {}
    res = _run(["squeue", "--noheader", "--array", "--jobs=" + ",".join(base_ids(job_ids)),
                "--format=%i|%T|%N|%r"], check=False)  # fmt: skip
    if res.returncode != 0:
        if "Invalid job id" in res.stderr:  # every one of them has left the queue
            return {}
        raise KdlabError(f"squeue failed: {one_line(res.stderr)}")
    out: dict[str, QueueEntry] = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            out[parts[0]] = QueueEntry(parts[1], parts[2], parts[3])
    return out


@dataclass(frozen=True)
class Ended:
    state: str  # COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, PREEMPTED, ...
    exit_code: str = ""
    source: str = ""  # sacct | scontrol


def ended(job_ids: list[str]) -> tuple[dict[str, Ended], str]:
    """How jobs that left the queue ended, and what told: ``sacct`` if accounting works, else ``scontrol`` (only jobs
    that ended within the controller's MinJobAge); the second value says which, or why neither could."""
    if not job_ids:
        return {}, ""
    res = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--jobs=" + ",".join(job_ids),
                "--format=JobID,State,ExitCode"], check=False)  # fmt: skip
    if res.returncode == 0:
        out = {}
        for line in res.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3:
                out[parts[0]] = Ended(parts[1].split()[0], parts[2], "sacct")
        return out, "ended jobs from sacct"
    why = one_line(res.stderr)
    r = _run(["scontrol", "--oneliner", "show", "job"], check=False)  # every job the controller still remembers
    wanted, out = set(job_ids), {}
    for line in r.stdout.splitlines():
        f = dict(m.groups() for m in re.finditer(r"\b(\w+)=(\S*)", line))
        ids = {f.get("JobId", "")}
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            ids.add(f"{f['ArrayJobId']}_{f['ArrayTaskId']}")
        for j in ids & wanted:
            out[j] = Ended(f.get("JobState", "UNKNOWN"), f.get("ExitCode", ""), "scontrol")
    return out, f"ended jobs from scontrol, which forgets them after MinJobAge (sacct: {why})"


def cancel(job_ids: list[str]) -> None:
    """``scancel`` the jobs (running kdlab processes get SIGTERM and stop resumably)."""
    if job_ids:
        _run(["scancel", *job_ids])
