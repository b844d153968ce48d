"""``kdlab train`` and ``kdlab distill`` (``kdlab keys`` lists their config keys: commands/keys.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdlab.cli import command
from kdlab.config import RunConfig
from kdlab.errors import KdlabError
from kdlab.launch.options import add_launcher_argument, launcher_overrides


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML recipe (optional with --resume: the run's own config.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.epochs=1 method.temperature=2")
    p.add_argument("--out", required=True, help="run directory to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (removes only kdlab's own files)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build data and models, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_launcher_argument(p)


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The config of a run command: the recipe (or, with --resume, the run's config.yaml) plus overrides."""
    from kdlab.config import load_config
    from kdlab.trust import distrust_folder

    distrust_folder(args.out, "run folder")  # code in it never counts as installed (kdlab.trust)
    config, overrides = args.config, list(args.overrides) + launcher_overrides(args)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `kdlab train --resume --out DIR key=value`
        config = None
    if config is None:
        if not args.resume:
            raise KdlabError("a config file is required (only --resume can reuse the run's own config.yaml)")
        config = Path(args.out) / "config.yaml"
        if not config.exists():
            raise KdlabError(f"nothing to resume: {args.out} holds no config.yaml (not a kdlab run)")
        from kdlab.engine.resume import load_saved_config

        return load_saved_config(Path(args.out), overrides)  # a damaged config.yaml: named, with its checksum
    return load_config(config, overrides)


def _run(args: argparse.Namespace, distill: bool) -> int:
    from kdlab.engine import Trainer
    from kdlab.methods import METHODS

    cfg = load_run_config(args)
    if args.quiet:
        cfg.train.progress = False
    needs = METHODS.get(cfg.method.name).needs_teacher
    if distill and not needs:
        raise KdlabError(f"method '{cfg.method.name}' does not use a teacher; use `kdlab train` for it")
    if not distill and needs:
        raise KdlabError(f"method '{cfg.method.name}' needs a teacher; use `kdlab distill`")
    if cfg.launcher.name != "local" and not args.dry_run:
        from kdlab.pipelines.runner import submit_run

        job = submit_run(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
        print(f"submitted {args.out} as {cfg.launcher.name} job {job}; follow it with `kdlab sweep --status {args.out}`")
        return 0
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    trainer = Trainer(cfg, args.out, resume=args.resume, overwrite=args.overwrite and not args.dry_run, log=log)
    if args.dry_run:
        what = f"{cfg.model.name} / {cfg.method.name}" + (f" / teacher {cfg.teacher.name}" if trainer.teacher else "")
        if trainer.dist.is_main:
            print(f"dry run ok: {what} on {cfg.data.name} ({trainer.data.num_train} train samples); nothing written")
        return 0
    summary = trainer.run().summary
    if trainer.dist.is_main:  # under torchrun: one summary, not one per process
        print(json.dumps(summary, indent=1))
    return 0


@command("train", "train a model on labels alone (teachers, baselines)", add_run_arguments, config_epilog=True)
def train(args: argparse.Namespace) -> int:
    return _run(args, distill=False)


@command("distill", "distill a student from the teacher checkpoint named in the config", add_run_arguments, True)
def distill(args: argparse.Namespace) -> int:
    return _run(args, distill=True)
