"""``kdlab analyze`` (the instruments on one run) and ``kdlab report`` (one HTML page comparing runs)."""

from __future__ import annotations

import argparse
import sys

from kdlab.cli import command, nonnegative_int, positive_int
from kdlab.errors import KdlabError


def _classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated class indices, got '{text}'") from None


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished kdlab run directory")
    p.add_argument(
        "--teacher", metavar="RUN_OR_CHECKPOINT",
        help="teacher to compare with: a run directory or a .safetensors file (default: the run's own teacher)",
    )  # fmt: skip
    p.add_argument("--teacher-arch", metavar="NAME", help="architecture of a --teacher .safetensors file")
    p.add_argument("--no-teacher", action="store_true", help="student-only measurements")
    p.add_argument("--split", choices=("train", "test"), default="train", help="data split to measure (default: train)")
    p.add_argument("--max-samples", type=positive_int, metavar="N", help="measure a fixed random subset of N samples")
    p.add_argument("--classes", type=_classes, metavar="A,B,C", help="the 3 classes of the template projection")
    p.add_argument("--tsne-samples", type=nonnegative_int, default=1000, metavar="N", help="t-SNE sample count (0: skip)")
    p.add_argument("--init-seeds", type=nonnegative_int, default=10, metavar="N", help="seeds for the init logit mean (0: skip)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the run's train.device)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR/analysis/")
    p.add_argument("--quiet", action="store_true", help="no progress messages")


@command("analyze", "measure a run: logit statistics, distances, geometry, alignment, theory checks", _analyze_args)
def analyze(args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from kdlab.engine.rundir import FolderLock
    from kdlab.instruments.analysis import analyze_run
    from kdlab.trust import distrust_folder

    for folder, role in ((args.run_dir, "run folder"), (args.teacher, "teacher's folder")):
        distrust_folder(folder, role)  # code in them never counts as installed (kdlab.trust)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    # it writes RUN_DIR/analysis/: not while another process (a training, another analyze) writes the run folder
    lock = FolderLock(args.run_dir) if Path(args.run_dir).is_dir() else contextlib.nullcontext()
    with lock:
        summary = analyze_run(
            args.run_dir, teacher=args.teacher, teacher_arch=args.teacher_arch, no_teacher=args.no_teacher,
            split=args.split, max_samples=args.max_samples, classes=args.classes, tsne_samples=args.tsne_samples,
            init_seeds=args.init_seeds, device=args.device, overwrite=args.overwrite, log=log,
        )  # fmt: skip
    st = summary["logit_stats"]["student"]
    lines = [f"{summary['label']}: {summary['num_samples']} {summary['split']} samples"]
    lines.append(f"  student logit sum  mean {st['sum']['mean']:.4g}  std {st['sum']['std']:.4g}")
    if "teacher" in summary["logit_stats"]:
        te = summary["logit_stats"]["teacher"]
        lines.append(f"  teacher logit sum  mean {te['sum']['mean']:.4g}  std {te['sum']['std']:.4g}")
        d = summary["figures"]["logit_distance_pdf"]["stats"]
        lines.append(f"  ‖z^s − z^t‖₂ mean {d['mean']:.4g}")
    al = summary.get("alignment") or {}
    if al.get("final_mu") is not None:
        lines.append(f"  μ = ‖W_t − W_s‖_F {al['final_mu']:.4g}  cosine {al['final_cos']:.4g}")
    if al.get("pearson_mu_loss"):
        lines.append(f"  Pearson r(μ, training loss) {al['pearson_mu_loss']['r']:.3f} over {al['pearson_mu_loss']['n']} epochs")
    lines.append(f"  wrote {args.run_dir.rstrip('/')}/analysis/ ({len(summary['figures'])} figures + summary.json)")
    print("\n".join(lines))
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run or sweep directories; analysed runs (`kdlab analyze`) also get the instrument sections")
    p.add_argument("--out", default="kdlab_report.html", metavar="FILE.html", help="default: kdlab_report.html")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


@command("report", "one self-contained HTML page comparing runs and sweeps (with the papers' numbers)", _report_args)
def report(args: argparse.Namespace) -> int:
    from kdlab.instruments.report import write_report

    if not args.out.endswith((".html", ".htm")):
        raise KdlabError(f"--out must name an .html file, got '{args.out}'")
    path = write_report(args.run_dirs, args.out, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
