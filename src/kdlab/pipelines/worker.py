"""One run in its own process — what every launcher starts: ``python -m kdlab.pipelines.worker JOB.json``.

The job file (written by :func:`kdlab.pipelines.runner.write_job`) holds ``kind`` (``plan``: a run of a sweep or
chain, which also records its training-split accuracy; ``run``: a plain ``kdlab train``/``distill`` run), the resolved
``config``, the run folder ``out`` and the plan folder ``root`` (for the plan-made teacher cache, built here if
missing). The worker decides itself whether to start, resume or skip the run, so running the same command again —
a requeued Slurm job, a sweep started again after a kill — resumes exactly and never redoes a finished run; the
run folder's lock keeps a second writer out.

SIGTERM, SIGUSR1 and SIGUSR2 (a scheduler's preemption or time-limit warning) stop the run resumably: the last epoch
checkpoint stays, the worker exits with 143; stop signals after the first are absorbed. It also exits when its
parent process goes away, so killing a local sweep never leaves orphan runs writing into the plan folder.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from types import FrameType


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(143)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def _stop_resumably() -> None:
    """SIGTERM, SIGUSR1 and SIGUSR2 raise :class:`~kdlab.signals.Terminated` once; later ones are absorbed.

    A time limit on Slurm delivers two stop signals within milliseconds (the scheduler's SIGUSR2 to every process of
    the job step, then the launcher's SIGTERM): the second must neither kill the worker in the middle of its cleanup
    nor raise into it. A worker that does not stop is killed by its launcher (SIGKILL after ``stop_s``)."""
    from kdlab.signals import Terminated

    stopping = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise Terminated()

    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, handler)


def run_job(path: str) -> dict:
    """Run (start, resume, or skip when finished) the job of a job file; returns the run's results."""
    from pathlib import Path

    from kdlab.config import validate
    from kdlab.errors import KdlabError
    from kdlab.fileio import read_json
    from kdlab.pipelines.plan_cache import ensure_teacher_cache
    from kdlab.pipelines.runner import load_result, run_status, run_task

    job = read_json(path, what="worker job file")
    if not isinstance(job, dict) or not {"kind", "config", "out"} <= set(job):
        raise KdlabError(f"{path} is not a kdlab worker job file")
    cfg, out = validate(job["config"]), Path(job["out"])
    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)

    def log(m: str) -> None:
        print(m, flush=True)

    if job["kind"] == "run":
        from kdlab.engine import Trainer
        from kdlab.engine.rundir import is_run_dir

        resume = out.is_dir() and is_run_dir(out)
        log(f"{'resuming' if resume else 'starting'} {out}")
        return Trainer(cfg, out, resume=resume, log=log).run().summary
    status = run_status(out, cfg)
    if status == "done":
        log(f"{out} is finished already")
        return load_result(out)
    if job.get("root"):
        ensure_teacher_cache(cfg, Path(job["root"]), log)
    log(f"{'resuming' if status == 'resume' else 'starting'} {out}")
    return run_task(cfg, out, resume=status == "resume", log=log)


def main(argv: list[str] | None = None) -> int:
    _exit_with_parent(os.getppid())
    _stop_resumably()
    from kdlab.errors import KdlabError
    from kdlab.signals import SIGTERM_EXIT, Terminated

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kdlab.pipelines.worker JOB.json", file=sys.stderr)
        return 2
    try:
        result = run_job(args[0])
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Terminated:
        print("kdlab: terminated (stopped resumably; the last epoch checkpoint is kept)", file=sys.stderr, flush=True)
        return SIGTERM_EXIT
    except KeyboardInterrupt:
        print("kdlab: interrupted", file=sys.stderr, flush=True)
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
