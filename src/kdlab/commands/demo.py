"""``kdlab demo``: the MNIST-1D walk-through (see :mod:`kdlab.demo`)."""

from __future__ import annotations

import argparse

from kdlab.cli import command, positive_int


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds per student method (default: 3)")
    p.add_argument("--teacher-epochs", type=positive_int, default=30, help="teacher epochs (default: 30)")
    p.add_argument("--student-epochs", type=positive_int, default=40, help="student epochs (default: 40)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of reusing finished runs in --out")
    p.add_argument("--methods", choices=("core", "all"), default="core",
                   help="core: CE / KD / MSE (default, < 1 min); all: every logit method ± Z-score (a few minutes)")


@command("demo", "MNIST-1D: train a CNN teacher, then distill an MLP with CE / KD / MSE over seeds", _args)
def demo(args: argparse.Namespace) -> int:
    from kdlab.demo import run_demo

    from kdlab.demo import CATALOG_RECIPES, STUDENT_RECIPES

    recipes = CATALOG_RECIPES if args.methods == "all" else STUDENT_RECIPES
    run_demo(args.out, seeds=args.seeds, teacher_epochs=args.teacher_epochs,
             student_epochs=args.student_epochs, overwrite=args.overwrite, recipes=recipes)  # fmt: skip
    return 0
