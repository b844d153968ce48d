"""``kdlab sweep``: a recipe (or study spec) over a grid of config values × seeds, with a results table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlab.cli import command, positive_int
from kdlab.errors import KdlabError


def add_plan_arguments(p: argparse.ArgumentParser, chain: bool = False) -> None:
    what = "study spec with stages:" if chain else "YAML recipe, or a study spec (recipe:/stages:, grid:, seeds:)"
    p.add_argument("config", help=what)
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value applied to every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis (repeatable; axes are crossed). Values are YAML: 0.1,1,[1,2],{name: kd_inf}")
    p.add_argument("--seeds", metavar="N|S1,S2,...", help="N seeds 0..N-1, or a list (default: the spec's, else the recipe's seed)")
    p.add_argument("--out", required=True, help="plan folder: one run folder per cell and seed, plus results.md/.csv")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="J", help="runs in parallel as worker processes (default 1: in-process)")
    p.add_argument("--threads", type=positive_int, metavar="T", help="torch threads per worker with --jobs (default: cores // jobs)")
    p.add_argument("--teacher-cache", type=positive_int, metavar="V",
                   help="replay teacher outputs from a cache of V augmented views per teacher (OUT/.teacher_cache/)")
    p.add_argument("--dry-run", action="store_true", help="validate every run's config and build one run per cell; run nothing")
    p.add_argument("--tables-only", action="store_true", help="only (re)write the tables from the finished runs")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines of every run (in-process runs)")


def run_plan_command(args: argparse.Namespace, chain: bool) -> int:
    from kdlab.pipelines import dry_run, load_plan, run_plan

    plan = load_plan(args.config, grid=args.grid, seeds=args.seeds, overrides=args.overrides,
                     teacher_cache=args.teacher_cache)  # fmt: skip
    if chain and plan.single:
        raise KdlabError(f"{args.config} has no 'stages:' list; use `kdlab sweep` for a single recipe")
    if args.dry_run:
        tasks = plan.expand(Path(args.out))
        dry_run(tasks)
        stages = len(plan.stages)
        print(f"dry run ok: {len(tasks)} runs ({stages} stage{'s' if stages > 1 else ''}); nothing written")
        return 0
    res = run_plan(plan, args.out, jobs=args.jobs, threads=args.threads, tables_only=args.tables_only,
                   verbose=args.verbose)  # fmt: skip
    md = res.out / "results.md"
    print(md.read_text())
    print(f"wrote {', '.join(str(p) for p in res.written)} ({res.seconds:.1f} s)", file=sys.stderr)
    return 0


@command("sweep", "run a recipe over a grid of config values × seeds; writes results.md/.csv and heatmaps",
         add_plan_arguments, config_epilog=True)  # fmt: skip
def sweep(args: argparse.Namespace) -> int:
    return run_plan_command(args, chain=False)
