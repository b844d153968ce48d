"""``kdlab train``, ``kdlab distill`` and ``kdlab keys``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kdlab.cli import command
from kdlab.config import RunConfig
from kdlab.errors import KdlabError


def config_keys_help() -> str:
    """Every config key with its default and description (generated from the schema and the method registry)."""
    from pydantic import BaseModel

    from kdlab.config import RunConfig
    from kdlab.methods import METHODS

    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            args = getattr(ann, "__args__", None) or (ann,)
            sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
            key = f"{prefix}{name}"
            if name == "method":
                continue
            if sub is not None:
                walk(sub, key + ".")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"  {key:<26} {default:<16} {field.description or ''}".rstrip())

    walk(RunConfig, "")
    lines.append(f"  {'method.name':<26} {repr('ce'):<16} method; its parameters are method.<param>:")
    for name in METHODS:
        for pname, field in METHODS.get(name).Params.model_fields.items():
            default = repr(field.get_default(call_default_factory=True))
            lines.append(f"    [{name}] method.{pname:<18} {default:<10} {field.description or ''}".rstrip())
    return "\n".join(lines)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML recipe (optional with --resume: the run's own config.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.epochs=1 method.temperature=2")
    p.add_argument("--out", required=True, help="run directory to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (removes only kdlab's own files)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build data and models, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The config of a run command: the recipe (or, with --resume, the run's config.yaml) plus overrides."""
    from kdlab.config import load_config

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `kdlab train --resume --out DIR key=value`
        config = None
    if config is None:
        if not args.resume:
            raise KdlabError("a config file is required (only --resume can reuse the run's own config.yaml)")
        config = Path(args.out) / "config.yaml"
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
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    trainer = Trainer(cfg, args.out, resume=args.resume, overwrite=args.overwrite and not args.dry_run, log=log)
    if args.dry_run:
        what = f"{cfg.model.name} / {cfg.method.name}" + (f" / teacher {cfg.teacher.name}" if trainer.teacher else "")
        print(f"dry run ok: {what} on {cfg.data.name} ({len(trainer.data.train)} train samples); nothing written")
        return 0
    print(json.dumps(trainer.run().summary, indent=1))
    return 0


@command("train", "train a model on labels alone (teachers, baselines)", add_run_arguments, config_epilog=True)
def train(args: argparse.Namespace) -> int:
    return _run(args, distill=False)


@command("distill", "distill a student from the teacher checkpoint named in the config", add_run_arguments, True)
def distill(args: argparse.Namespace) -> int:
    return _run(args, distill=True)


@command("keys", "list every config key with its default and meaning", lambda p: None)
def keys(args: argparse.Namespace) -> int:
    print(config_keys_help())
    return 0
