"""``kdlab eval``: accuracy of a weights file on a dataset split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kdlab.cli import command
from kdlab.errors import KdlabError


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .safetensors file, a kdlab run directory or a PyTorch .pth state dict "
                   "(read weights-only)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--config", help="recipe describing data and model (default: the run directory's config.yaml)")
    p.add_argument("--split", choices=("test", "train", "val"), default="test",
                   help="which split to evaluate (default: test; val: the part of the training set data.val_split "
                   "holds out, as a tuning trial measured it)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


@command("eval", "top-1 / top-5 of a weights file (.safetensors, run directory or .pth)", _args, config_epilog=True)
def evaluate(args: argparse.Namespace) -> int:
    from kdlab.config import load_config
    from kdlab.data import build_dataset
    from kdlab.engine import checkpoint as ck
    from kdlab.engine.evaluation import evaluate_split
    from kdlab.engine.objective import select_device
    from kdlab.models import build
    from kdlab.models.convert import read_weights
    from kdlab.trust import distrust_folder

    distrust_folder(args.checkpoint, "run folder")  # code in it never counts as installed (kdlab.trust)
    path = ck.resolve_weights_path(args.checkpoint)
    config = args.config
    if config is None:
        config = Path(args.checkpoint) / "config.yaml"
        if not config.is_file():
            raise KdlabError("--config is required unless CHECKPOINT is a kdlab run directory")
    cfg = load_config(config, args.overrides)
    if args.split == "val" and not cfg.data.val_split:
        raise KdlabError("--split val: this config holds out no val split (data.val_split is 0); give the run's "
                         "data.val_split and data.val_seed as overrides")  # fmt: skip
    device = select_device(cfg.train.device)
    data = build_dataset(cfg.data).to(device)
    model = build(cfg.model, num_classes=data.num_classes)
    ck.load_into(model, read_weights(path, list(model.state_dict())), cfg.model.name, f"checkpoint {path}")
    model.to(device).eval()
    n = data.split_size(args.split)
    ev = evaluate_split(model, data, args.split, cfg.train.eval_batch_size)
    acc, top5 = ev["acc"], ev["top5"]
    result = {"checkpoint": str(path), "model": cfg.model.name, "split": args.split, "n": n, "acc": acc,
              "top5": top5}  # fmt: skip
    text = f"{cfg.model.name} {args.split} accuracy: {acc:.2f}% (top-5 {top5:.2f}%, n={n})"
    print(json.dumps(result) if args.json else text)
    return 0
