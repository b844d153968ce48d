"""What ``--resume`` checks before continuing a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlab.config import RunConfig, load_config
from kdlab.errors import ConfigError

# keys that may differ between the first start and a resume
RESUME_MAY_CHANGE = frozenset({"train.progress", "train.threads", "train.device", "train.epochs"})


def first_difference(a: Any, b: Any, ignore: set[str] | frozenset[str], prefix: str = "") -> str | None:
    """The first dotted key at which two nested mappings differ (``None`` when equal), skipping ``ignore``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in ignore:
                continue
            d = first_difference(a.get(k), b.get(k), ignore, key)
            if d:
                return d
        return None
    return None if a == b else prefix


def check_same_config(cfg: RunConfig, out: Path) -> None:
    """Refuse to resume ``out`` with a config that differs from the one it was started with."""
    # through the current schema, so that keys added to kdlab since the run started take their defaults
    saved = load_config(out / "config.yaml").to_dict()
    diff = first_difference(saved, cfg.to_dict(), RESUME_MAY_CHANGE)
    if diff:
        raise ConfigError(f"--resume with a different config: '{diff}' differs from {out / 'config.yaml'}")
