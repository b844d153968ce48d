"""Run directories: what a run writes and the rules that keep existing work safe.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` and ``metrics.csv`` (one row per
epoch), ``checkpoints/`` (resumable state), ``best.safetensors`` / ``model.safetensors`` (best and final weights) and
``summary.json``. An existing run is never overwritten unless ``--overwrite`` is given, and a non-empty folder that
is not a kdlab run is never touched.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path
from typing import Any

from kdlab.engine.atomic import atomic_write_text
from kdlab.errors import KdlabError

RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "model.safetensors", "best.safetensors")
RUN_DIRS = ("checkpoints", "analysis")


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / "checkpoints").is_dir()


def check_out_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber existing work; raise a one-line error describing what to do instead."""
    if resume and overwrite:
        raise KdlabError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise KdlabError(f"output path {path} exists and is not a folder")
    if resume:
        if not is_run_dir(path):
            raise KdlabError(f"nothing to resume: {path} is not a kdlab run directory")
        return
    if not path.exists() or not any(path.iterdir()):
        return
    if not is_run_dir(path):
        raise KdlabError(f"output folder {path} is not empty and is not a kdlab run; choose another --out")
    if not overwrite:
        raise KdlabError(f"{path} already holds a run; pass --resume to continue it or --overwrite to replace it")


def clear_run(path: Path) -> None:
    """Remove the files a kdlab run writes (and only those)."""
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)


class MetricsLog:
    """Appends one JSON row per epoch to ``metrics.jsonl`` and mirrors all rows to ``metrics.csv``."""

    def __init__(self, run_dir: Path) -> None:
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []

    def restore(self, last_epoch: int) -> None:
        """Keep rows up to ``last_epoch`` (rows of an epoch whose checkpoint was never written are dropped)."""
        rows = []
        if self.jsonl.is_file():
            for line in self.jsonl.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash
                if row.get("epoch", 0) <= last_epoch:
                    rows.append(row)
        self.rows = rows
        self._flush()

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._flush()

    def _flush(self) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.csv, buf.getvalue())
