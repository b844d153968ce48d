"""Checkpoints: weights as safetensors, training state as JSON, both verified by checksum on load.

A training checkpoint is a folder ``checkpoints/epoch_NNNN/`` holding ``state.safetensors`` (student, method parts,
optimizer buffers, RNG state) and ``state.json`` (epoch, counters, optimizer hyper-parameters and the SHA-256 of the
tensor file). The folder is assembled under a temporary name and renamed into place, so a crash leaves either the
complete checkpoint or none. On load, checkpoints are tried newest first; one that is truncated or corrupted is
reported and skipped in favour of the previous good one.

``state.json`` is itself covered: a copy of it (less the checksum) is stored in the safetensors header, which the
checksum covers, so a hand-edited ``state.json`` is refused naming the edited key (:class:`EditedCheckpointError`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from kdlab.engine.atomic import atomic_write_bytes, atomic_write_text, fsync_dir
from kdlab.errors import CheckpointError, WriteError
from kdlab.fileio import check_file, read_bytes, read_json

FORMAT = "kdlab-checkpoint-v1"
#: safetensors header entry holding the copy of ``state.json`` (without ``tensors_sha256``)
META_KEY = "kdlab.state"


class EditedCheckpointError(CheckpointError):
    """A checkpoint's ``state.json`` differs from the record its checksummed tensor file holds: edited by hand."""


def _cpu_contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically write a state dict as safetensors; returns its SHA-256."""
    data = st_save(_cpu_contiguous(state_dict), metadata=metadata)
    return atomic_write_bytes(path, data)


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle) with a one-line error when it is missing or damaged; a folder, FIFO
    or device is named as such and the size is bounded (``KDLAB_MAX_BYTES_CHECKPOINT``, :mod:`kdlab.fileio`)."""
    return _parse_weights(read_bytes(path, "checkpoint", "checkpoint", CheckpointError), path)


def _parse_weights(data: bytes, path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except Exception as err:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{path} is not a valid safetensors file ({type(err).__name__}: {err})") from None


def resolve_weights_path(path: str | Path) -> Path:
    """A ``.safetensors`` file, or a kdlab run directory (its final ``model.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("model.safetensors", "best.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without model.safetensors (is it a finished kdlab run?)")
    return check_file(path, "checkpoint", "checkpoint", CheckpointError)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """Strictly load ``state`` into ``model`` with a one-line error naming the first mismatch."""
    adapt = getattr(model, "adapt_to_state_dict", None)
    if callable(adapt):  # e.g. attach the reused-classifier head a SimKD/IJCKD student was saved with
        adapt(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"missing '{missing[0]}'" if missing else f"unexpected '{unexpected[0]}'"
        raise CheckpointError(
            f"{source} does not fit architecture '{arch}': {what} "
            f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source} does not fit architecture '{arch}': '{k}' has shape {list(state[k].shape)} "
                f"in the checkpoint but {list(v.shape)} in the model"
            )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------------------
# training checkpoints


@dataclass
class TrainState:
    """Everything needed to continue a run exactly: tensors plus JSON-able counters."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def optimizer_to_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{idx}.{key}"] = val
            else:
                scalars.setdefault(str(idx), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for idx, d in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_train_state(ckpt_dir: Path, epoch: int, state: TrainState, keep: int = 2) -> Path:
    """Write ``ckpt_dir/epoch_NNNN`` atomically and prune all but the newest ``keep`` checkpoints."""
    final = ckpt_dir / f"epoch_{epoch:04d}"
    tmp = ckpt_dir / f".tmp-epoch_{epoch:04d}-{os.getpid()}"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        meta = dict(state.meta, format=FORMAT, epoch=epoch)
        record = json.dumps(meta, sort_keys=True)  # fails here, before writing, on a value JSON cannot hold
        digest = save_weights(tmp / "state.safetensors", state.tensors, metadata={META_KEY: record})
        meta["tensors_sha256"] = digest
        atomic_write_text(tmp / "state.json", json.dumps(meta, indent=1))
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise WriteError(f"could not write checkpoint {final}: {err.strerror or err}; earlier ones are intact") from None
        raise
    for old in list_checkpoints(ckpt_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders, newest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.glob("epoch_*") if p.is_dir()), reverse=True)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (read without loading any tensor)."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        return dict(header.get("__metadata__") or {})
    except (ValueError, AttributeError):
        return {}


def verify_checkpoint(path: Path) -> TrainState:
    """Load one checkpoint folder, checking its format, its checksum and that ``state.json`` was not edited."""
    from kdlab.engine.resume import first_difference

    meta_path, tensor_path = path / "state.json", path / "state.safetensors"
    meta = read_json(meta_path, "json", "checkpoint state", CheckpointError)  # bounded; a FIFO or device is refused
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a kdlab checkpoint")
    data = read_bytes(tensor_path, "checkpoint", "checkpoint tensors", CheckpointError)
    if hashlib.sha256(data).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensor_path}: checksum mismatch (truncated or corrupted)")
    record = _header_metadata(data).get(META_KEY)
    if record is not None:  # checkpoints written before kdlab kept the copy have none
        ours = {k: v for k, v in meta.items() if k != "tensors_sha256"}
        try:
            recorded = json.loads(record)
        except ValueError:
            raise CheckpointError(f"{tensor_path}: damaged state record in its header") from None
        diff = first_difference(recorded, ours, frozenset())
        if diff is not None:
            raise EditedCheckpointError(
                f"{meta_path} was edited by hand: '{diff}' differs from the record in its checksummed "
                f"{tensor_path.name}; restore it (or delete this checkpoint folder to resume from an earlier one)"
            )
    return TrainState(_parse_weights(data, tensor_path), meta)


def find_latest(ckpt_dir: Path) -> tuple[TrainState | None, list[str]]:
    """The newest checkpoint that verifies, and a note on each damaged one skipped on the way (newest first).

    A hand-edited ``state.json`` is not skipped: :class:`EditedCheckpointError` is raised.
    """
    problems: list[str] = []
    for path in list_checkpoints(ckpt_dir):
        try:
            return verify_checkpoint(path), problems
        except EditedCheckpointError:
            raise
        except CheckpointError as err:
            problems.append(f"{path.name}: {err}")
    return None, problems


def load_latest(ckpt_dir: Path) -> TrainState | None:
    """The newest checkpoint that verifies; damaged ones are reported with a warning and skipped."""
    state, problems = find_latest(ckpt_dir)
    for note in problems:
        warnings.warn(f"skipping damaged checkpoint: {note}", stacklevel=2)
    return state
