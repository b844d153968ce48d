"""One run of a plan in its own process: ``python -m kdlab.pipelines.worker`` reads a JSON job on stdin.

The job is ``{"config": <resolved config mapping>, "out": <run folder>, "resume": <bool>}``. The worker exits when
its parent (the ``kdlab sweep`` / ``kdlab chain`` process) goes away, so killing a sweep never leaves orphan runs
writing into the plan folder; the interrupted run is resumed by the next invocation.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _exit_with_parent(parent: int) -> None:
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(143)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main() -> int:
    _exit_with_parent(os.getppid())
    from kdlab.signals import SIGTERM_EXIT, Terminated, raise_on_sigterm

    raise_on_sigterm()
    from kdlab.config import validate
    from kdlab.errors import KdlabError
    from kdlab.pipelines.runner import run_task

    try:
        job = json.loads(sys.stdin.read())
        cfg = validate(job["config"])
        if cfg.train.threads:
            import torch

            torch.set_num_threads(cfg.train.threads)
        result = run_task(cfg, job["out"], resume=bool(job["resume"]), log=lambda m: print(m, flush=True))
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr, flush=True)
        return 2
    except Terminated:
        print("kdlab: terminated (SIGTERM)", file=sys.stderr, flush=True)
        return SIGTERM_EXIT
    except KeyboardInterrupt:
        print("kdlab: interrupted", file=sys.stderr, flush=True)
        return 130
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
