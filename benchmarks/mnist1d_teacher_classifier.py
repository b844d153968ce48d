"""MNIST-1D benchmark of the feature / teacher-classifier methods (ideal-joint-classifier-kd Tables 1, 2, 3 and 5 in
miniature): CNN teacher (``teacher_cnn.yaml``) → MLP student (``mnist1d_mlp``), the recipes' 40 epochs, several seeds.

Rows: the student alone (CE), KD, FitNet, SRRL, the student trained with CE through the frozen teacher classifier
(Table 5), SimKD and IJCKD with each connector (Table 2), and IJCKD's α_ce ablation (Table 3). For the methods that
predict through the reused teacher classifier the saved ``model.safetensors`` is also reloaded *alone* (plain
``kdlab.models.build`` + strict load, no teacher) and re-evaluated; that column must equal the test accuracy.

    python benchmarks/mnist1d_teacher_classifier.py --out runs/bench_teacher_classifier --seeds 3

Finished runs are reused (delete the folder to start over). Prints a markdown table (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import kdlab.config
from kdlab.config import load_config
from kdlab.data import batches, build_dataset
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.engine.teachers import load_teacher
from kdlab.models import build

RECIPES = Path(kdlab.config.__file__).parent / "configs" / "mnist1d"

# (group, label, recipe, overrides)
ROWS: list[tuple[str, str, str, list[str]]] = [
    ("methods", "CE (student alone)", "student_ce", []),
    ("methods", "KD (T=4)", "student_kd", []),
    ("methods", "FitNet (1x1, hint 100)", "student_fitnet", []),
    ("methods", "SRRL (1x1)", "student_srrl", []),
    ("methods", "CE through frozen teacher classifier (1x1)", "student_teacher_classifier", []),
    ("connectors", "SimKD 1x1", "student_simkd", ["method.connector=1x1"]),
    ("connectors", "SimKD 1x1-1x1", "student_simkd", ["method.connector=1x1-1x1"]),
    ("connectors", "SimKD bottleneck", "student_simkd", ["method.connector=bottleneck"]),
    ("connectors", "IJCKD 1x1", "student_ijckd", ["method.connector=1x1"]),
    ("connectors", "IJCKD 1x1-1x1", "student_ijckd", ["method.connector=1x1-1x1"]),
    ("connectors", "IJCKD bottleneck", "student_ijckd", ["method.connector=bottleneck"]),
    *[("alpha_ce", f"IJCKD 1x1, α_ce = {a}", "student_ijckd", [f"method.ce_weight={a}"])
      for a in (0.0, 0.1, 0.2, 0.5)],
    ("alpha_ce", "IJCKD 1x1, α_ce = 0, β = 1 (logit + feature)", "student_ijckd",
     ["method.ce_weight=0.0", "method.feat_weight=1.0"]),
    ("alpha_ce", "IJCKD 1x1, α_ce = 1, β = 1 (CE + logit + feature)", "student_ijckd", ["method.feat_weight=1.0"]),
]  # fmt: skip


def _slug(label: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) else "_" for c in label).strip("_").lower()


@torch.inference_mode()
def deployed_accuracy(run_dir: Path, cfg, data) -> float:  # type: ignore[no-untyped-def]
    """Accuracy of ``model.safetensors`` loaded into a plain ``build(cfg.model)``: no method, no teacher."""
    model = build(cfg.model, num_classes=data.num_classes)
    ck.load_into(model, ck.load_weights_file(run_dir / "model.safetensors"), cfg.model.name, str(run_dir))
    model.eval()
    test = batches(data.test, data.transform, 1000, train=False)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in test)
    return 100.0 * correct / len(data.test)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_teacher_classifier")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipes' 40)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's 30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated groups to run (methods,connectors,alpha_ce)")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = ["train.progress=false", f"train.threads={args.threads}"]
    t0 = time.perf_counter()

    teacher_dir = out / "teacher"
    if not (teacher_dir / "summary.json").is_file():
        extra = [f"train.epochs={args.teacher_epochs}"] if args.teacher_epochs else []
        Trainer(load_config(RECIPES / "teacher_cnn.yaml", common + extra), teacher_dir, overwrite=True).run()
    teacher_acc = json.loads((teacher_dir / "summary.json").read_text())["final_test_acc"]

    data = None
    teacher = None
    rows = [r for r in ROWS if args.only is None or r[0] in args.only.split(",")]
    results: dict[str, list[tuple[float, float | None]]] = {}
    for group, label, recipe, overrides in rows:
        for seed in range(args.seeds):
            run_dir = out / _slug(label) / f"seed{seed}"
            extra = [f"seed={seed}", *overrides] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
            if recipe != "student_ce":
                extra.append(f"teacher.checkpoint={teacher_dir}")
            cfg = load_config(RECIPES / f"{recipe}.yaml", common + extra)
            if data is None:
                data = build_dataset(cfg.data)
            if not (run_dir / "summary.json").is_file():
                if teacher is None and cfg.teacher is not None:
                    teacher = load_teacher(cfg, data.num_classes)
                Trainer(cfg, run_dir, overwrite=True, dataset=data, teacher=teacher if cfg.teacher else None).run()
            acc = json.loads((run_dir / "summary.json").read_text())["final_test_acc"]
            weights = ck.load_weights_file(run_dir / "model.safetensors")
            deployed = deployed_accuracy(run_dir, cfg, data) if any(k.startswith("kd_head.") for k in weights) else None
            results.setdefault(label, []).append((acc, deployed))
            print(f"[{time.perf_counter() - t0:6.0f}s] {label} seed {seed}: {acc:.2f}%"
                  + (f" (deployed alone {deployed:.2f}%)" if deployed is not None else ""), file=sys.stderr, flush=True)

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    print(f"\nMNIST-1D, CNN teacher ({teacher_acc:.2f}%) → MLP student, final test accuracy (%), "
          f"mean ± std over {args.seeds} seeds\n")  # fmt: skip
    print("| group | method | test acc | deployed alone |")
    print("|---|---|---|---|")
    for group, label, _, _ in rows:
        accs = [a for a, _ in results[label]]
        deps = [d for _, d in results[label] if d is not None]
        print(f"| {group} | {label} | {ms(accs)} | {ms(deps) if deps else '—'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
