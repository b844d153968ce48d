"""Launching: *where* the tasks of a plan run — this machine (default) or a Slurm cluster (submitit).

A plan (one run, a chain, a sweep, a search) is built the same whatever the launcher; each of its runs becomes a
:class:`LaunchTask` whose command is the same kdlab invocation everywhere, so resume, the one-writer-per-folder lock,
teacher-before-student order and the results tables do not depend on the launcher::

    from kdlab.launch import LaunchTask, get_launcher, kdlab_argv

    launcher = get_launcher(cfg.launcher)                # or get_launcher("local", jobs=4)
    tasks = [LaunchTask(f"trial-{i}", kdlab_argv("train", "r.yaml", "--out", f"out/t{i}"), Path(f"out/logs/t{i}.log"))
             for i in range(8)]
    sub = launcher.submit(tasks, Path("out/.kdlab-launch"))  # checked first: all submitted, or none
    ends = sub.wait(on_end=print)                         # name -> TaskEnd(state=done|failed|cancelled|skipped)

``kdlab.launch.status.task_statuses(folder)`` reads back where each task of a launch folder stands.
"""

from __future__ import annotations

from typing import Any

from kdlab.config import LauncherConfig
from kdlab.engine.rundir import LAUNCH_RECORDS
from kdlab.errors import ConfigError
from kdlab.launch.base import END_STATES, LaunchTask, Launcher, Submission, TaskEnd, check_tasks, kdlab_argv
from kdlab.launch.local import LocalLauncher
from kdlab.registry import Registry

#: the launch folder of a plan folder or of a single run submitted to a launcher
LAUNCH_DIR = LAUNCH_RECORDS


def _slurm(settings: LauncherConfig, **kwargs: Any) -> Launcher:
    try:
        from kdlab.launch.slurm import SlurmLauncher
    except ImportError as err:
        if getattr(err, "name", "") and str(err.name).startswith("submitit"):
            raise ConfigError("--launcher slurm needs the submitit package: pip install 'kdlab[slurm]'") from None
        raise
    return SlurmLauncher(settings, **kwargs)


#: launcher name -> factory(settings, jobs=, threads=)
LAUNCHERS: Registry[Any] = Registry("launcher")
LAUNCHERS.add("local", LocalLauncher)
LAUNCHERS.add("slurm", _slurm)


def get_launcher(spec: str | LauncherConfig = "local", *, jobs: int = 1, threads: int | None = None) -> Launcher:
    """The launcher named by ``spec`` (a name, or a ``launcher:`` config section whose ``name`` picks it).

    ``jobs`` is the number of local worker processes (only the local launcher takes more than 1); ``threads`` caps
    the torch/OpenMP threads of each task's process.
    """
    settings = LauncherConfig(name=spec) if isinstance(spec, str) else spec
    return LAUNCHERS.get(settings.name)(settings, jobs=jobs, threads=threads)


__all__ = [
    "END_STATES", "LAUNCHERS", "LAUNCH_DIR", "LaunchTask", "Launcher", "Submission", "TaskEnd", "check_tasks",
    "get_launcher", "kdlab_argv",
]  # fmt: skip
