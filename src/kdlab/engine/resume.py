"""What ``--resume`` checks before continuing a run folder.

Everything a resume depends on is verified, and a mismatch is a one-line error naming what differs:

* the config asked for against the run's ``config.yaml`` (:func:`check_same_config`; ``train.epochs`` may grow,
  never shrink);
* ``config.yaml`` against the copy and SHA-256 each checkpoint records (a hand-edited file is refused, key named);
* ``state.json`` against the checksummed record in its tensor file (:func:`kdlab.engine.checkpoint.verify_checkpoint`);
* the teacher's weights against the SHA-256 recorded when the run started.

A resume never silently restarts: with no usable checkpoint it is an error saying what was found — unless no epoch
ever finished (nothing to lose), which starts the run from epoch 1 and says so.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import RunConfig, load_config, read_yaml, validate
from kdlab.engine import checkpoint as ck
from kdlab.engine.rundir import read_metrics
from kdlab.errors import CheckpointError, ConfigError, KdlabError, warn
from kdlab.fileio import read_bytes, read_json

# keys that may differ between the first start and a resume
RESUME_MAY_CHANGE = frozenset({"train.progress", "train.threads", "train.device", "train.epochs", "launcher"})


def first_difference(a: Any, b: Any, ignore: set[str] | frozenset[str], prefix: str = "") -> str | None:
    """The first dotted key at which two nested mappings differ (``None`` when equal), skipping ``ignore``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            key = f"{prefix}.{k}" if prefix else str(k)
            if key in ignore:
                continue
            d = first_difference(a.get(k), b.get(k), ignore, key)
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else (prefix or "<top level>")


def _config_bytes(path: Path) -> bytes:
    return read_bytes(path, "config", "config file", ConfigError)


def _recorded_config(out: Path) -> tuple[Path, str] | None:
    """The newest checkpoint's ``state.json`` that records a ``config_sha256``, and that checksum."""
    for path in ck.list_checkpoints(out / "checkpoints"):
        try:
            meta = read_json(path / "state.json", "json", "checkpoint state", CheckpointError)
        except KdlabError:
            continue
        if isinstance(meta, dict) and isinstance(meta.get("config_sha256"), str):
            return path, meta["config_sha256"]
    return None


def load_saved_config(out: Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's ``config.yaml`` (plus ``overrides``), checked first on its own: a file that no longer loads (empty,
    truncated, damaged) is refused naming the file and — when a checkpoint recorded one — the checksum mismatch,
    not the first validation error the damage causes."""
    path = out / "config.yaml"
    try:
        load_config(path)
    except ConfigError as err:
        data = _config_bytes(path)  # a FIFO, a device or an oversized file: that is the message
        state = "empty" if not data.strip() else f"damaged ({err})"
        record = _recorded_config(out)
        now = hashlib.sha256(data).hexdigest()
        if record is None:
            raise ConfigError(f"{path} is {state}, and no checkpoint records its checksum; restore it or start "
                              "again with a recipe and --overwrite") from None  # fmt: skip
        ckpt, want = record
        if want == now:  # unchanged since the checkpoint: this kdlab no longer accepts it
            raise ConfigError(f"{path}: {err}") from None
        raise ConfigError(
            f"{path} is {state}: its SHA-256 {now[:12]}… does not match the {want[:12]}… recorded by checkpoint "
            f"{ckpt.name}; restore it (the original is under 'config' in {ckpt / 'state.json'})"
        ) from None
    return load_config(path, overrides) if overrides else load_config(path)


def check_same_config(cfg: RunConfig, out: Path) -> None:
    """Refuse to resume ``out`` with a config that differs from the one it was started with, or with fewer epochs."""
    # through the current schema, so that keys added to kdlab since the run started take their defaults
    saved = load_saved_config(out)
    diff = first_difference(saved.to_dict(), cfg.to_dict(), RESUME_MAY_CHANGE)
    if diff:
        raise ConfigError(f"--resume with a different config: '{diff}' differs from {out / 'config.yaml'}")
    if cfg.train.epochs < saved.train.epochs:
        raise ConfigError(
            f"--resume with train.epochs={cfg.train.epochs}, fewer than the {saved.train.epochs} the run was started "
            "with: shortening a run is refused (extending it is allowed); start a new run instead"
        )


def extend_epochs(out: Path, epochs: int, log: Callable[[str], None] = lambda m: None) -> None:
    """A resume asking for more epochs than ``config.yaml`` holds: record the new count there (atomically) and drop
    ``summary.json``, which described the shorter run; the run's end writes both consistently again."""
    from kdlab.engine.atomic import atomic_write_text

    path = out / "config.yaml"
    raw = read_yaml(path)
    before = (raw.get("train") or {}).get("epochs")
    if not isinstance(before, int) or epochs <= before:
        return
    raw.setdefault("train", {})["epochs"] = epochs
    atomic_write_text(path, yaml.safe_dump(raw, sort_keys=False))
    (out / "summary.json").unlink(missing_ok=True)
    log(f"extending {out} from {before} to {epochs} epochs")


#: data settings that do not change the training inputs a teacher sees (a teacher cache may differ in them);
#: ``augment_seed`` is checked on its own (a cache fixes it for the run)
CACHE_MAY_DIFFER = frozenset({"root", "workers", "prefetch", "label_noise", "label_noise_seed", "augment_seed",
                              "max_test_samples", "read_test"})  # fmt: skip


def check_cache_inputs(recorded: Any, data: Any, cache: Path | str) -> None:
    """Refuse a teacher cache made with data settings that change the inputs (``data.shift``, ``data.augment``, …).

    ``recorded`` is the ``data`` section stored in the cache's metadata (skipped when the cache has none); ``data``
    is the run's ``DataConfig``. Keys the cache does not record (made by an older kdlab) are not compared.
    """
    if not isinstance(recorded, dict):
        return
    now = data.model_dump(mode="json")
    ignore = CACHE_MAY_DIFFER | {k for k in now if k not in recorded}
    diff = first_difference(recorded, now, ignore)
    if diff is not None:
        raise ConfigError(
            f"teacher cache {cache} was made with data.{diff}={recorded.get(diff)!r} but this run has "
            f"data.{diff}={now.get(diff)!r}; its outputs are for other inputs — rebuild it with kdlab cache-teacher"
        )


def integrity_record(out: Path, teacher_sha256: str | None) -> dict[str, Any]:
    """What each checkpoint records so that the next resume can verify ``config.yaml`` and the teacher."""
    path = out / "config.yaml"
    return {
        "config_sha256": hashlib.sha256(_config_bytes(path)).hexdigest(),
        "config": read_yaml(path),
        "teacher_sha256": teacher_sha256,
    }


def _normalized(raw: Any) -> Any:
    """A recorded config through the current schema (keys added since take their defaults), else as recorded."""
    try:
        return validate(raw).to_dict()
    except KdlabError:
        return raw


def load_resume_state(
    out: Path, teacher_sha256: str | None, log: Callable[[str], None] = lambda m: None,
    warn: Callable[[str], None] = warn,
) -> ck.TrainState | None:
    """The verified checkpoint to continue ``out`` from; ``None`` when no epoch ever finished (a fresh start).

    Raises a one-line error when there is finished work but no usable checkpoint, when ``config.yaml`` was edited
    since the checkpoint was written, or when the teacher's weights changed. A damaged checkpoint skipped on the way
    is a ``warn`` line (shown with ``--quiet`` too).
    """
    ckpt_dir = out / "checkpoints"
    state, problems = ck.find_latest(ckpt_dir)
    if state is None:
        # a row of metrics.jsonl is appended just before its epoch's checkpoint, so one row alone may be an epoch
        # killed before its checkpoint; a second row means a checkpoint had been written (and is now gone)
        done = len(read_metrics(out))
        done = done if done > 1 else 0
        finished = [n for n in ("summary.json", "model.safetensors") if (out / n).is_file()]
        if problems:
            raise CheckpointError(
                f"--resume: no usable checkpoint in {ckpt_dir} ({'; '.join(problems)}); nothing was changed — "
                "restore a checkpoint or start again with --overwrite"
            )
        if done or finished:
            what = f"{done} finished epoch(s) in metrics.jsonl" if done else " and ".join(finished)
            raise CheckpointError(
                f"--resume: {out} has {what} but no checkpoint ({ckpt_dir} is missing or empty); nothing was "
                "changed — restore the checkpoints or start again with --overwrite"
            )
        log(f"no epoch of {out} had finished; starting it from epoch 1")
        return None
    for note in problems:
        warn(f"skipping damaged checkpoint {note}")
    m = state.meta
    cfg_path = out / "config.yaml"
    if m.get("config_sha256") is not None and hashlib.sha256(_config_bytes(cfg_path)).hexdigest() != m["config_sha256"]:
        diff = first_difference(_normalized(m.get("config")), load_config(cfg_path).to_dict(), RESUME_MAY_CHANGE)
        if diff is not None:
            raise ConfigError(
                f"{cfg_path} was edited after checkpoint epoch {m['epoch']} was written: '{diff}' differs from the "
                "config the run was trained with; restore it (only train.epochs may grow, via an override)"
            )
    if m.get("teacher_sha256") and teacher_sha256 and m["teacher_sha256"] != teacher_sha256:
        raise CheckpointError(
            f"--resume: the teacher's weights changed since the run started (sha256 {teacher_sha256[:12]}… now, "
            f"{m['teacher_sha256'][:12]}… when trained); restore them or start a new run"
        )
    return state
