"""MNIST-1D table of the baseline methods of issue 12 (the rows of the papers' comparison tables), several seeds.

CNN teacher (``teacher_cnn.yaml``, 32/64/128 channels) → smaller CNN student (16/32/64 channels, as
``student_cnn_simkd.yaml``), so that every feature method sees 1-D feature maps. Every method runs with its released
defaults (kdlab's method defaults) on the shared MNIST-1D recipe (``base.yaml``: 40 epochs, SGD 0.05 Nesterov,
cosine). Rows: the student alone (CE), KD (T = 4) for reference, then every method of issue 12 that is registered.

    python benchmarks/mnist1d_baselines.py --out runs/bench_baselines --seeds 3

Finished runs are reused (delete the folder to start over); a method that fails is reported with its error and the
table goes on. Prints a markdown table: final test accuracy mean ± std over seeds and wall time per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import kdlab.config
from kdlab.config import load_config
from kdlab.data import build_dataset
from kdlab.engine import Trainer
from kdlab.engine.teachers import load_teacher
from kdlab.errors import KdlabError
from kdlab.methods import METHODS

RECIPES = Path(kdlab.config.__file__).parent / "configs" / "mnist1d"
ISSUE_12 = ["fitnet", "at", "rkd", "pkt", "sp", "nst", "vid", "crd", "ofd", "reviewkd", "catkd", "wsld", "ft", "ab"]
REFERENCE = [("CE (student alone)", "ce", []), ("KD (T=4)", "kd", ["method.temperature=4.0"])]
# Where a released default does not fit a 4,000-sample, 10-class problem (see docs/studies.md):
OVERRIDES = {
    "crd": ["method.nce_k=4096"],  # 16384 noise samples per positive > the 4,000 training samples (and 4x the time)
    "catkd": ["method.cat_weight=1.0"],  # the released β = 15 (resnet32x4 → 8x4) diverges here (non-finite loss)
}
STUDENT = ["model.name=mnist1d_cnn", "model.kwargs={widths: [16, 32, 64]}"]


def rows() -> list[tuple[str, str, list[str]]]:
    """(label, method, overrides) of every row, issue-12 methods only when registered."""
    out = list(REFERENCE)
    for name in ISSUE_12:
        if name in METHODS:
            ov = OVERRIDES.get(name, [])
            out.append((f"{name} ({', '.join(o.removeprefix('method.') for o in ov)})" if ov else name, name, ov))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_baselines")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-list", default=None, help="comma-separated seeds to run (default: 0 … seeds−1)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the recipe's 40)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default: the recipe's 30)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default=None, help="comma-separated method names to run")
    p.add_argument("--report", action="store_true", help="only print the table of the runs already finished")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = ["train.progress=false", f"train.threads={args.threads}"]
    t0 = time.perf_counter()

    teacher_dir = out / "teacher"
    if not (teacher_dir / "summary.json").is_file() and not args.report:
        extra = [f"train.epochs={args.teacher_epochs}"] if args.teacher_epochs else []
        Trainer(load_config(RECIPES / "teacher_cnn.yaml", common + extra), teacher_dir, overwrite=True).run()
    teacher_acc = json.loads((teacher_dir / "summary.json").read_text())["final_test_acc"]

    data = teacher = None
    selected = [r for r in rows() if args.only is None or r[1] in args.only.split(",")]
    results: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, str] = {}
    for label, method, overrides in selected:
        for seed in [int(x) for x in args.seed_list.split(",")] if args.seed_list else range(args.seeds):
            run_dir = out / method / f"seed{seed}"
            extra = [*STUDENT, f"method.name={method}", f"seed={seed}", *overrides]
            extra += [f"train.epochs={args.epochs}"] if args.epochs else []
            if METHODS.get(method).needs_teacher:
                extra += ["teacher.name=mnist1d_cnn", f"teacher.checkpoint={teacher_dir}"]
            if args.report and not (run_dir / "summary.json").is_file():
                continue
            try:
                cfg = load_config(RECIPES / "base.yaml", common + extra)
                if data is None:
                    data = build_dataset(cfg.data)
                if not (run_dir / "summary.json").is_file():
                    if teacher is None and cfg.teacher is not None:
                        teacher = load_teacher(cfg.teacher, data.num_classes)
                    Trainer(cfg, run_dir, overwrite=True, dataset=data, teacher=teacher if cfg.teacher else None).run()
            except (KdlabError, RuntimeError, ValueError) as err:
                errors[label] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
                print(f"[{time.perf_counter() - t0:6.0f}s] {label}: FAILED {errors[label]}", file=sys.stderr,
                      flush=True)
                break
            summary = json.loads((run_dir / "summary.json").read_text())
            results.setdefault(label, []).append((summary["final_test_acc"], summary["wall_time_s"]))
            print(f"[{time.perf_counter() - t0:6.0f}s] {label} seed {seed}: {summary['final_test_acc']:.2f}% "
                  f"({summary['wall_time_s']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip

    def ms(values: list[float]) -> str:
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {sd:.2f}"

    print(f"\nMNIST-1D, CNN teacher ({teacher_acc:.2f}%) → CNN student (16/32/64 channels), final test accuracy (%), "
          f"mean ± std over {args.seeds} seeds; wall time per run (s, mean)\n")  # fmt: skip
    print("| method | test acc | seeds | wall time / run (s) |")
    print("|---|---|---|---|")
    for label, _, _ in selected:
        if label in results:
            accs, walls = zip(*results[label])
            print(f"| {label} | {ms(list(accs))} | {len(accs)} | {statistics.mean(walls):.0f} |")
        else:
            print(f"| {label} | {'failed: ' + errors[label] if label in errors else 'not run'} | 0 | — |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
