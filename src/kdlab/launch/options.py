"""The ``--launcher`` option of the commands that run things (train, distill, sweep, chain, cache-teacher)."""

from __future__ import annotations

import argparse


def add_launcher_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launcher", metavar="local|slurm",
                   help="where to run: local (this machine; default) or slurm (submitted as jobs through submitit, "
                        "settings in the launcher: section, e.g. launcher.partition=gpu launcher.time=4:00:00); "
                        "same as launcher.name=...")  # fmt: skip


def launcher_overrides(args: argparse.Namespace) -> list[str]:
    """``--launcher NAME`` as the config override ``launcher.name=NAME`` (empty without the option)."""
    name = getattr(args, "launcher", None)
    if name is None:
        return []
    from kdlab.launch import LAUNCHERS

    LAUNCHERS.get(name)  # an unknown name: one line with the choices
    return [f"launcher.name={name}"]
