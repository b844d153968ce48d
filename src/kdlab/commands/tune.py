"""``kdlab tune``: search config values with Optuna (TPE, pruning on the per-epoch val accuracy); ``kdlab.tune``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdlab.cli import command, nonnegative_int, positive_int
from kdlab.errors import ConfigError, UsageError
from kdlab.fileio import read_text


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML recipe whose values are searched")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value applied to every trial")
    p.add_argument("--space", action="append", default=[], metavar="KEY=KIND(ARGS)",
                   help="a searched key (repeatable): uniform(a,b[,step]) log(a,b) int(a,b[,step]) logint(a,b) "
                   "choice(x,y,...), e.g. 'method.temperature=log(1,16)'")
    p.add_argument("--trials", type=positive_int, metavar="N", help="trials in the study (a rerun may raise it)")
    p.add_argument("--out", help="study folder: study.journal, trials/trial-NNNN/ runs, results.md, best.yaml")
    p.add_argument("--parallel", type=positive_int, default=1, metavar="P",
                   help="workers sharing the study (local processes, or Slurm jobs with --launcher slurm)")
    p.add_argument("--launcher", metavar="NAME", help="where workers run: local (default) | slurm (the recipe's launcher: "
                   "section gives the Slurm settings)")
    p.add_argument("--threads", type=positive_int, metavar="T", help="torch threads per worker (default: cores // P)")
    p.add_argument("--objective", choices=("final", "best"), default="final",
                   help="val top-1 of the last epoch (default) or of the best epoch")
    p.add_argument("--sampler", default="tpe", help="tpe (default) | random")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="sampler seed (default 0)")
    p.add_argument("--startup-trials", type=nonnegative_int, metavar="K",
                   help="random trials before TPE models the space (default: trials // 3, between 2 and 10)")
    p.add_argument("--pruner", default="median", help="median (default) | halving (successive halving) | hyperband | none")
    p.add_argument("--pruner-startup", type=nonnegative_int, default=5, metavar="K",
                   help="median: trials that finish before any is pruned (default 5)")
    p.add_argument("--pruner-warmup", type=nonnegative_int, default=0, metavar="E",
                   help="median: epochs before a trial can be pruned; halving/hyperband: minimum epochs (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and the space; write nothing")
    p.add_argument("--tables-only", action="store_true", help="only rewrite results.md, importance.json and best.yaml")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)  # a worker of the study in OUT (what --parallel starts)
    p.add_argument("--worker-index", type=nonnegative_int, default=0, help=argparse.SUPPRESS)


@command("tune", "search config values with Optuna (TPE, pruning on val accuracy); trials never read the test split",
         add_tune_arguments, config_epilog=True)  # fmt: skip
def tune(args: argparse.Namespace) -> int:
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("kdlab tune needs the optuna package: pip install 'kdlab[tune]'") from None
    if args.worker:
        from kdlab.tune.worker import run_worker

        n = run_worker(Path(args.worker), args.worker_index, args.threads, log)
        log(f"tune worker: {n} trials run")
        return 0
    if args.tables_only and args.out:
        return _tables_only(Path(args.out))
    if not args.config or not args.out:
        raise UsageError("kdlab tune: a recipe and --out DIR are required (see `kdlab tune --help`)")
    out = Path(args.out)
    if args.trials is None:
        raise UsageError("kdlab tune: --trials N is required")
    from kdlab.tune.search import SearchOptions, build_spec, run_tune

    overrides = list(args.overrides)
    opts = SearchOptions(args.trials, args.objective, args.sampler, args.seed, args.startup_trials, args.pruner,
                         args.pruner_startup, args.pruner_warmup)  # fmt: skip
    spec, params = build_spec(args.config, overrides, args.space, opts)
    from kdlab.config import validate

    launcher = validate(spec.base).launcher  # the recipe's launcher: section; --launcher picks where workers run
    if args.launcher:  # (not written into the trials or best.yaml: where a run runs never changes its results)
        launcher = launcher.model_copy(update={"name": args.launcher})
    if args.dry_run:  # one trial (each key at its low end) built as `kdlab train --dry-run` builds a run
        from kdlab.engine import Trainer
        from kdlab.tune.worker import trial_config

        cfg = trial_config(spec, params, {p.key: p.corners()[0] for p in params}, 0)
        Trainer(cfg, out / "trials" / "dry-run")
        print(f"dry run ok: {len(params)} searched keys, {args.trials} trials on {launcher.name}; nothing written")
        return 0
    if launcher.name != "local" or args.parallel > 1:  # a launcher that would refuse the workers: before any write
        from kdlab.tune.search import launcher_for

        launcher_for(out, args.parallel, launcher, args.threads)
    written = run_tune(spec, params, out, parallel=args.parallel, launcher=launcher, threads=args.threads, log=log)
    print(read_text(out / "results.md", "text"))
    log(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _tables_only(out: Path) -> int:
    from kdlab.tune.report import write_report
    from kdlab.tune.space import parse_space
    from kdlab.tune.study import TuneSpec, open_study

    spec = TuneSpec.load(out)
    written = write_report(open_study(out, spec), spec, parse_space(spec.space), out)
    print(read_text(out / "results.md", "text"))
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
