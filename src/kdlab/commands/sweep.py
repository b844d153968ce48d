"""``kdlab sweep``: a recipe (or study spec) over a grid of config values × seeds, with a results table.

``--launcher slurm`` submits the runs as Slurm jobs (``--wait`` follows them); ``--status OUT`` and ``--cancel OUT``
report on and stop the runs of a plan folder (or of one run folder), whichever launcher runs them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlab.cli import command, positive_int
from kdlab.errors import KdlabError, UsageError
from kdlab.launch.options import add_launcher_argument, launcher_overrides


def add_plan_arguments(p: argparse.ArgumentParser, chain: bool = False) -> None:
    what = "study spec with stages:" if chain else "YAML recipe, or a study spec (recipe:/stages:, grid:, seeds:)"
    p.add_argument("config", nargs="?", help=what)
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value applied to every run")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis (repeatable; axes are crossed). Values are YAML: 0.1,1,[1,2],{name: kd_inf}")
    p.add_argument("--seeds", metavar="N|S1,S2,...", help="N seeds 0..N-1, or a list (default: the spec's, else the recipe's seed)")
    p.add_argument("--out", help="plan folder: one run folder per cell and seed, plus results.md/.csv")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="J", help="runs in parallel as worker processes (default 1: in-process)")
    p.add_argument("--threads", type=positive_int, metavar="T", help="torch threads per worker with --jobs (default: cores // jobs)")
    p.add_argument("--teacher-cache", type=positive_int, metavar="V",
                   help="replay teacher outputs from a cache of V augmented views per teacher (OUT/.teacher_cache/)")
    p.add_argument("--dry-run", action="store_true", help="validate every run's config and build one run per cell; run nothing")
    p.add_argument("--tables-only", action="store_true", help="only (re)write the tables from the finished runs")
    p.add_argument("--verbose", action="store_true", help="per-epoch lines of every run (in-process runs)")
    add_launcher_argument(p)
    p.add_argument("--wait", action="store_true", help="--launcher slurm: follow the jobs to their ends, then write the "
                   "tables (default: submit, print the job ids and return; a last job writes the tables)")  # fmt: skip
    p.add_argument("--status", metavar="OUT", help="where each run of plan folder OUT (or run folder OUT) stands: "
                   "pending, running (epoch, node), done (top-1/5), failed (error, log), cancelled; exit 1 if one failed")
    p.add_argument("--cancel", metavar="OUT", help="stop the queued and running jobs (or the local sweep) of OUT; "
                   "runs stop resumably")  # fmt: skip


def _folder_command(args: argparse.Namespace) -> int | None:
    """``--status OUT`` / ``--cancel OUT`` (they take the folder alone); ``None`` when neither is given."""
    if args.status is None and args.cancel is None:
        return None
    flag = "--status" if args.status is not None else "--cancel"
    if args.status is not None and args.cancel is not None:
        raise UsageError("--status and --cancel exclude each other")
    if args.config is not None or args.out is not None or args.overrides or args.grid:
        raise UsageError(f"{flag} takes only the folder: kdlab sweep {flag} OUT")
    from kdlab.pipelines import cancel_plan, plan_status

    if args.cancel is not None:
        actions = cancel_plan(args.cancel)
        print("\n".join(actions) if actions else f"nothing is queued or running for {args.cancel}")
        return 0
    report = plan_status(args.status)
    print(report.text())
    return 1 if report.failed else 0


def tables_command(args: argparse.Namespace, chain: bool) -> list[str]:
    """The command that rewrites the tables of this plan (the last job of a Slurm submission)."""
    from kdlab.launch import kdlab_argv

    argv = ["chain" if chain else "sweep", str(Path(args.config).absolute()), *args.overrides]
    for g in args.grid:
        argv += ["--grid", g]
    for flag, value in (("--seeds", args.seeds), ("--teacher-cache", args.teacher_cache)):
        if value is not None:
            argv += [flag, str(value)]
    return list(kdlab_argv(*argv, "--out", str(Path(args.out).absolute()), "--tables-only"))


def run_plan_command(args: argparse.Namespace, chain: bool) -> int:
    folder = _folder_command(args)
    if folder is not None:
        return folder
    if args.config is None or args.out is None:
        raise UsageError(f"kdlab {'chain' if chain else 'sweep'}: the {'spec' if chain else 'recipe'} and --out are "
                         "required (or --status OUT / --cancel OUT)")  # fmt: skip
    args.overrides = list(args.overrides) + launcher_overrides(args)
    from kdlab.fileio import read_text
    from kdlab.pipelines import dry_run, load_plan, run_plan
    from kdlab.trust import distrust_folder

    distrust_folder(args.out, "run folder")  # code in it never counts as installed (kdlab.trust)
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
                   verbose=args.verbose, wait=args.wait, tables_argv=tables_command(args, chain))  # fmt: skip
    if res.submitted:
        jobs = sorted({o.job_id for o in res.submitted if o.job_id})
        print(f"{len(res.submitted)} run(s) submitted or queued (jobs {', '.join(jobs[:6])}{' …' if len(jobs) > 6 else ''}); "
              f"follow them with `kdlab {'chain' if chain else 'sweep'} --status {args.out}`")  # fmt: skip
        return 0
    md = res.out / "results.md"
    print(read_text(md, "text", "results table"))
    print(f"wrote {', '.join(str(p) for p in res.written)} ({res.seconds:.1f} s)", file=sys.stderr)
    return 0


@command("sweep", "run a recipe over a grid of config values × seeds; writes results.md/.csv and heatmaps",
         add_plan_arguments, config_epilog=True)  # fmt: skip
def sweep(args: argparse.Namespace) -> int:
    return run_plan_command(args, chain=False)
