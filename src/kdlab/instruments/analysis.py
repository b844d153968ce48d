"""``analyze_run``: every instrument on one finished run, written to ``RUN_DIR/analysis/``.

The folder holds one PNG per figure and ``summary.json`` with the numbers behind each of them (histogram counts and
edges, heatmap matrices, projected coordinates, per-epoch series, statistics, theory checks). It is assembled in a
temporary folder and renamed into place, so an interrupted analysis leaves the previous one (or none), and an
existing analysis is only replaced when asked to (``overwrite=True``). The models come from
:mod:`kdlab.instruments.subjects`, the measurements and figures from :mod:`kdlab.instruments.measure`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kdlab.errors import KdlabError
from kdlab.instruments.measure import json_safe, measure
from kdlab.instruments.outputs import collect_outputs, subset_indices
from kdlab.instruments.subjects import load_model, method_label, resolve_teacher

ANALYSIS_DIR = "analysis"
SUMMARY = "summary.json"


def analyze_run(
    run_dir: str | Path,
    *,
    teacher: str | Path | None = None,
    teacher_arch: str | None = None,
    no_teacher: bool = False,
    split: str = "train",
    max_samples: int | None = None,
    classes: Sequence[int] | None = None,
    tsne_samples: int = 1000,
    init_seeds: int = 10,
    bins: int = 50,
    device: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure everything on one run and write ``RUN_DIR/analysis/``; returns the summary (also in summary.json)."""
    from kdlab.config import load_config
    from kdlab.data import build_dataset
    from kdlab.engine.checkpoint import resolve_weights_path
    from kdlab.engine.objective import select_device

    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise KdlabError(f"{run_dir} is not a kdlab run directory (no config.yaml)")
    if split not in ("train", "test"):
        raise KdlabError(f"split must be 'train' or 'test', got '{split}'")
    if max_samples is not None and max_samples <= 0:
        raise KdlabError(f"max_samples must be positive, got {max_samples}")
    if tsne_samples < 0 or init_seeds < 0:
        raise KdlabError("tsne_samples and init_seeds must be ≥ 0")
    out_dir = run_dir / ANALYSIS_DIR
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise KdlabError(f"{out_dir} already exists; pass --overwrite to replace it")
    if teacher is not None and no_teacher:
        raise KdlabError("--teacher and --no-teacher exclude each other")
    if device is not None and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise KdlabError(f"device must be auto, cpu, cuda or cuda:N, got '{device}'")

    cfg = load_config(run_dir / "config.yaml")
    weights = resolve_weights_path(run_dir)
    t_spec = None if no_teacher else resolve_teacher(cfg, teacher, teacher_arch)
    device = select_device(device or cfg.train.device)
    data = build_dataset(cfg.data).to(device)
    k = data.num_classes
    if classes is not None:
        classes = [int(c) for c in classes]
        if len(classes) != 3 or len(set(classes)) != 3 or not all(0 <= c < k for c in classes):
            raise KdlabError(f"--classes needs 3 distinct class indices in [0, {k - 1}], got {classes}")
    student = load_model(cfg.model, weights, k, "student weights").to(device)
    t_model = None if t_spec is None else t_spec.load(k).to(device)

    n = data.split_size(split)
    idx = subset_indices(n, max_samples, cfg.seed)
    bs = cfg.train.eval_batch_size
    log(f"analyzing {run_dir} on {n if idx is None else len(idx)} {split} samples")
    s_out = collect_outputs(student, data, split, bs, idx)
    t_out = None if t_model is None else collect_outputs(t_model, data, split, bs, idx)

    label = f"{run_dir.name} ({cfg.model.name}, {method_label(cfg)})"
    _remove_stale_tmp(run_dir)
    tmp = run_dir / f".{ANALYSIS_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        summary = measure(
            run_dir, cfg, label, split, s_out, t_out, t_spec, student, t_model, tmp, k,
            classes=classes, tsne_samples=tsne_samples, init_seeds=init_seeds, bins=bins,
            inputs=data.example_batch(min(n, 512), split), device=device, log=log,
        )  # fmt: skip
        text = json.dumps(json_safe(summary), indent=1, allow_nan=False)
        (tmp / SUMMARY).write_text(text)
        if out_dir.exists():
            if out_dir.is_dir():
                shutil.rmtree(out_dir)
            else:
                out_dir.unlink()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir}")
    return json.loads(text)


def _remove_stale_tmp(run_dir: Path) -> None:
    """Remove temporary analysis folders left by analyses that died (their process no longer exists)."""
    for tmp in run_dir.glob(f".{ANALYSIS_DIR}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue
