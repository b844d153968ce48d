"""``kdlab import-checkpoint``: RepDistiller / mdistiller CIFAR zoo checkpoints → kdlab safetensors weights."""

from __future__ import annotations

import argparse
import json

from kdlab.cli import command, positive_int


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .pth checkpoint of the standard CIFAR zoo (RepDistiller or mdistiller)")
    p.add_argument("--arch", required=True, help="kdlab architecture name (e.g. resnet32x4, wrn_40_2, vgg13, ResNet50)")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classes (default: read from the classifier weights)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")


@command(
    "import-checkpoint",
    "convert a RepDistiller / mdistiller checkpoint to safetensors (no pickled code is ever run)",
    _args,
)
def import_checkpoint(args: argparse.Namespace) -> int:
    from kdlab.models import MODELS
    from kdlab.models.convert import convert

    MODELS.get(args.arch)  # unknown names: one-line error with a suggestion, before reading anything
    summary = convert(args.file, args.arch, args.out, overwrite=args.overwrite, num_classes=args.num_classes)
    if args.json:
        print(json.dumps(summary))
    else:
        extra = "".join(f", {k} {summary[k]:.4g}" for k in ("epoch", "best_acc", "accuracy") if k in summary)
        print(f"wrote {summary['out']}: {summary['arch']}, {summary['num_classes']} classes, "
              f"{summary['tensors']} tensors{extra}")  # fmt: skip
    return 0


def zoo_listing() -> list[dict]:
    """The zoo by family (:data:`kdlab.models.FAMILIES`): each model's name, aliases and parameter count, computed on
    the meta device without initialising anything."""
    import torch
    from torch.overrides import TorchFunctionMode

    from kdlab.models import ALIASES, FAMILIES, build, num_params

    class ShapesOnly(TorchFunctionMode):
        """Random initialisation skipped: only the parameters' shapes are needed (on the meta device, torch would
        route ``normal_`` through its compiler stack, seconds per model)."""

        SKIP = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.random_, torch.Tensor.bernoulli_}

        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return args[0] if func in self.SKIP else func(*args, **(kwargs or {}))

    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    listing = []
    for key, (title, shape, classes, names) in FAMILIES.items():
        with torch.device("meta"), ShapesOnly():
            rows = [{"name": n, "params": num_params(build(n, num_classes=classes)), "aliases": aliases.get(n, [])}
                    for n in names]  # fmt: skip
        listing.append({"family": key, "about": title, "input": shape, "classes": classes, "models": rows})
    return listing


def format_listing(listing: list[dict]) -> str:
    """:func:`zoo_listing` as text: one block per family, a line per model with its parameters and aliases."""
    lines = []
    for fam in listing:
        lines.append(f"[{fam['family']}] {fam['about']}; input {fam['input']}, parameters at {fam['classes']} classes")
        for row in fam["models"]:
            also = f"   (also: {', '.join(row['aliases'])})" if row["aliases"] else ""
            lines.append(f"  {row['name']:<14} {row['params']:>12,}{also}")
        lines.append("")
    lines.append("[cifar] wrn_D_W: any WRN with depth 6n+4 and width ≥ 1 (e.g. wrn_22_8).")
    lines.append("A user model: model.name=package.module:Class or path/to/file.py:Class (kdlab keys model).")
    return "\n".join(lines)


def _zoo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the listing as JSON")


@command("zoo", "list the model zoo by family (CIFAR, ImageNet, MNIST-1D): names, aliases, inputs, parameters", _zoo_args)
def zoo(args: argparse.Namespace) -> int:
    listing = zoo_listing()
    print(json.dumps(listing) if args.json else format_listing(listing))
    return 0
