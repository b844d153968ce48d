"""``kdlab chain``: sequential distillation, each stage's student teaching the next stage (kl-vs-mse Table 6)."""

from __future__ import annotations

import argparse

from kdlab.cli import command
from kdlab.commands.sweep import add_plan_arguments, run_plan_command


@command("chain", "sequential distillation: run the stages of a study spec, each student teaching the next",
         lambda p: add_plan_arguments(p, chain=True), config_epilog=True)  # fmt: skip
def chain(args: argparse.Namespace) -> int:
    return run_plan_command(args, chain=True)
