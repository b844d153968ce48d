"""Distil into *your own* model: kdlab taps it with forward hooks — no change to its ``forward``.

``TinyNet`` below is an ordinary PyTorch module that knows nothing about kdlab. A config names it by file and class
and names two of its modules: the final ``nn.Linear`` (``classifier: out``) and the module whose output is the feature
map that gets pooled (``features: trunk``)::

    model:
      name: examples/user_model.py:TinyNet     # or an installed package's class: mypkg.nets:TinyNet
      classifier: out
      features: trunk
      kwargs: {width: 24}

A ``.py`` file named in a config is imported only with ``--trust-code`` (``KDLAB_TRUST_CODE=1``; in Python
``kdlab.trust.trusting()``, as below): this script trusts the one file it is, its own code. A class of an installed
package needs no flag.

Run from the repository root (CPU, about a minute)::

    python examples/user_model.py --out runs/user_model

It trains the MNIST-1D CNN teacher, distils ``TinyNet`` with SimKD (the student then predicts through the teacher's
frozen classifier, saved with it), reloads the saved student *alone* and checks it predicts exactly as at the end of
training, and shows that the weights keep ``TinyNet``'s own parameter names.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small 1-D CNN for length-40 MNIST-1D signals (a stand-in for any user model)."""

    def __init__(self, num_classes: int = 10, width: int = 24) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU())
        self.trunk = nn.Sequential(
            nn.Conv1d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(),
            nn.Conv1d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm1d(2 * width), nn.ReLU(),
        )  # fmt: skip
        self.out = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.out(self.trunk(self.stem(x)).mean(dim=2))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/user_model", help="output folder (default: runs/user_model)")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--student-epochs", type=int, default=20)
    parser.add_argument("--method", default="simkd", help="simkd | ijckd | srrl | fitnet | teacher_classifier | kd")
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    from kdlab.trust import trusting

    with trusting():  # the config names this very file (kdlab.trust): trust it, and nothing beyond this script
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, float]:
    import kdlab.config
    from kdlab.config import load_config, read_recipe
    from kdlab.engine import checkpoint as ck
    from kdlab.engine import run
    from kdlab.models import build

    out = Path(args.out)
    base = read_recipe(Path(kdlab.config.__file__).parent / "configs" / "mnist1d" / "base.yaml")
    common = [f"data.num_samples={args.num_samples}", "train.progress=false"]
    if args.threads:
        common.append(f"train.threads={args.threads}")

    teacher_dir = out / "teacher"
    if not (teacher_dir / "model.safetensors").is_file():
        cfg = load_config(None, common + [f"train.epochs={args.teacher_epochs}"],
                          base=dict(base, model={"name": "mnist1d_cnn"}))  # fmt: skip
        run(cfg, teacher_dir, overwrite=True)

    me = f"{Path(__file__).resolve()}:TinyNet"
    student_cfg = dict(
        base,
        model={"name": me, "classifier": "out", "features": "trunk", "kwargs": {"width": 24}},
        teacher={"name": "mnist1d_cnn", "checkpoint": str(teacher_dir)},
        # FitNet hints the one tapped feature: its default, stage 2 as released, needs a model that names its stages
        method={"name": args.method, **({"hint_layer": None} if args.method == "fitnet" else {})},
    )
    cfg = load_config(None, common + [f"train.epochs={args.student_epochs}"], base=student_cfg)
    result = run(cfg, out / args.method, overwrite=True)
    acc = result.summary["final_test_acc"]

    # Deploy alone: rebuild from the config and the weights file only (no teacher), evaluate again.
    from kdlab.data import batches, build_dataset

    data = build_dataset(cfg.data)
    deployed = build(cfg.model, num_classes=data.num_classes)
    weights = ck.load_weights_file(out / args.method / "model.safetensors")
    ck.load_into(deployed, weights, me, "student weights")
    deployed.eval()
    correct = 0
    with torch.inference_mode():
        for x, y, _ in batches(data.test, data.transform, 1000, train=False):
            correct += int((deployed(x).argmax(1) == y).sum())
    deployed_acc = 100.0 * correct / len(data.test)

    # The weights use TinyNet's own names: they load into a plain TinyNet (minus the reused-classifier head).
    plain = TinyNet(num_classes=data.num_classes, width=24)
    plain.load_state_dict({k: v for k, v in weights.items() if not k.startswith("kd_head.")}, strict=True)

    print(f"teacher {result.summary['teacher_test_acc']:.2f}%  |  TinyNet via {args.method}: {acc:.2f}% at the end "
          f"of training, {deployed_acc:.2f}% reloaded alone")  # fmt: skip
    return {"final_test_acc": acc, "deployed_acc": deployed_acc}


if __name__ == "__main__":
    main()
