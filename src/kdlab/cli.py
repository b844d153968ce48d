"""``kdlab`` command line: train, distill, eval, demo.

Config keys are set in a YAML recipe and overridden on the command line as ``key.sub=value`` (see ``kdlab keys``).
Every user error prints one line ``kdlab: error: ...`` and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kdlab.errors import KdlabError


def _config_keys_help() -> str:
    """A listing of every config key with its default and description (generated from the schema)."""
    from pydantic import BaseModel

    from kdlab.config import RunConfig
    from kdlab.methods import METHODS

    lines: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = next(
                (a for a in (getattr(ann, "__args__", None) or (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                None,
            )
            key = f"{prefix}{name}"
            if sub is not None and name != "method":
                walk(sub, key + ".")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            desc = field.description or ""
            lines.append(f"  {key:<26} {default:<14} {desc}".rstrip())

    walk(RunConfig, "")
    lines.append("  method.name                'ce'           method; its parameters are method.<param>:")
    for name in METHODS:
        cls = METHODS.get(name)
        for pname, field in cls.Params.model_fields.items():
            default = repr(field.get_default(call_default_factory=True))
            lines.append(f"    [{name}] method.{pname:<17} {default:<10} {field.description or ''}".rstrip())
    return "\n".join(lines)


def _add_run_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", nargs="?" if not config_required else None, help="YAML recipe (e.g. configs/mnist1d/teacher_cnn.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.epochs=1 method.temperature=2")
    p.add_argument("--out", required=True, help="run directory to create (or to continue with --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last good checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out (only kdlab's own files)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, build data and models, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    keys = _config_keys_help()
    parser = argparse.ArgumentParser(
        prog="kdlab", description="Knowledge distillation of classifiers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    epilog = "config keys (set in the YAML file or as key.sub=value):\n" + keys

    p = sub.add_parser("train", help="train a model on labels alone (teachers, baselines)", epilog=epilog, formatter_class=fmt)
    _add_run_args(p, config_required=False)
    p = sub.add_parser("distill", help="distill a student from the teacher checkpoint named in the config", epilog=epilog, formatter_class=fmt)
    _add_run_args(p, config_required=False)

    p = sub.add_parser("eval", help="evaluate a weights file (.safetensors or run directory)", epilog=epilog, formatter_class=fmt)
    p.add_argument("checkpoint", help="a .safetensors file or a kdlab run directory")
    p.add_argument("--config", help="recipe describing data and model (default: the run directory's config.yaml)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split to evaluate")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = sub.add_parser("demo", help="MNIST-1D: train a CNN teacher, distill an MLP with CE / KD / MSE over seeds")
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per student method (default: 3)")
    p.add_argument("--teacher-epochs", type=int, default=30, help="teacher epochs (default: 30)")
    p.add_argument("--student-epochs", type=int, default=40, help="student epochs (default: 40)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo output")

    sub.add_parser("keys", help="list every config key with its default and meaning")
    return parser


def _load(args: argparse.Namespace):
    from kdlab.config import load_config

    config = args.config
    overrides = list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        overrides.insert(0, config)  # `kdlab train --resume --out DIR key=value`
        config = None
    if config is None:
        if not getattr(args, "resume", False):
            raise KdlabError("a config file is required (only --resume can reuse the run's own config.yaml)")
        config = Path(args.out) / "config.yaml"
    return load_config(config, overrides)


def cmd_run(args: argparse.Namespace, distill: bool) -> int:
    from kdlab.engine import Trainer
    from kdlab.methods import METHODS

    cfg = _load(args)
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
        print(f"dry run ok: {cfg.model.name} / {cfg.method.name} on {cfg.data.name}, {len(trainer.data.train)} train samples")
        return 0
    result = trainer.run()
    print(json.dumps(result.summary, indent=1))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kdlab.config import load_config
    from kdlab.data import batches, build_dataset
    from kdlab.engine import checkpoint as ck
    from kdlab.engine.trainer import select_device
    from kdlab.models import build

    path = ck.resolve_weights_path(args.checkpoint)
    config = args.config
    if config is None:
        run_cfg = Path(args.checkpoint) / "config.yaml"
        if not run_cfg.is_file():
            raise KdlabError("--config is required unless CHECKPOINT is a kdlab run directory")
        config = run_cfg
    cfg = load_config(config, args.overrides)
    device = select_device(cfg.train.device)
    data = build_dataset(cfg.data).to(device)
    model = build(cfg.model.name, num_classes=data.num_classes)
    ck.load_into(model, ck.load_weights_file(path), cfg.model.name, f"checkpoint {path}")
    model.to(device).eval()
    split = getattr(data, args.split)
    import torch

    correct = 0
    with torch.inference_mode():
        for x, y, _ in batches(split, data.transform, cfg.train.eval_batch_size, train=False):
            correct += int((model(x).argmax(1) == y).sum())
    result = {"checkpoint": str(path), "model": cfg.model.name, "split": args.split, "n": len(split),
              "acc": 100.0 * correct / len(split)}  # fmt: skip
    print(json.dumps(result) if args.json else f"{cfg.model.name} {args.split} accuracy: {result['acc']:.2f}% (n={len(split)})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdlab.demo import run_demo

    run_demo(args.out, seeds=args.seeds, teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
             overwrite=args.overwrite)  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "keys":
            print(_config_keys_help())
            return 0
        handlers = {
            "train": lambda a: cmd_run(a, distill=False),
            "distill": lambda a: cmd_run(a, distill=True),
            "eval": cmd_eval,
            "demo": cmd_demo,
        }
        return handlers[args.command](args)
    except KdlabError as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("kdlab: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
