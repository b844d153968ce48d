"""Import checkpoints of the standard CIFAR zoo (RepDistiller, mdistiller) into kdlab's safetensors weights.

Both toolkits write ``torch.save`` pickles (``shared/specs/cifar_zoo_state_dicts.json``, section ``format``):

* RepDistiller: a dict with ``model`` (plain state dict, CUDA tensors when trained on GPU) and ``epoch``,
  ``best_acc`` / ``accuracy`` (0-dim tensors), ``optimizer``; ``*_last.pth`` also holds ``opt``, an
  ``argparse.Namespace``;
* mdistiller: ``student_*`` files hold ``{'model': student state dict}``; full states (``latest``, ``best``,
  ``epoch_N``) hold the ``DataParallel(Distiller)`` state dict, keys ``module.student.*`` / ``module.teacher.*``.

Files are read with ``torch.load(weights_only=True, map_location="cpu")``: PyTorch's restricted unpickler, which
rebuilds tensors and plain containers and refuses every other global, so a file that would run code on load is
rejected *before* anything in it runs. The student weights are then loaded strictly into the kdlab architecture
(identical names and shapes) and written as safetensors.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdlab.errors import CheckpointError, KdlabError, check_output_file
from kdlab.fileio import open_binary

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_STATE_KEYS = ("model", "state_dict", "net")


@dataclass
class Imported:
    """A foreign checkpoint read safely: the candidate state dict plus what else the file said."""

    state: dict[str, torch.Tensor]
    source_format: str
    info: dict[str, Any] = field(default_factory=dict)


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, with one-line errors.

    Raises :class:`CheckpointError` when the file is missing, is not a PyTorch file, or pickles any other object
    (the object is never constructed: PyTorch's weights-only unpickler stops at its global).
    """
    path = Path(path)
    try:  # a regular file within KDLAB_MAX_BYTES_CHECKPOINT (a folder, FIFO or device is named as such)
        with open_binary(path, "checkpoint", "checkpoint", CheckpointError) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        m = _GLOBAL.search(text)
        if m is None:
            detail = (text.split("WeightsUnpickler error:")[-1].strip().splitlines() or [""])[0][:120]
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint of tensors and plain containers ({detail})"
            ) from None
        what = m.group(1)
        hint = ""
        if what == "argparse.Namespace":
            hint = (" (RepDistiller's *_last.pth stores its argparse options; use the ckpt_epoch_*.pth or *_best.pth"
                    " file of the same run, which hold the same 'model' weights)")  # fmt: skip
        raise CheckpointError(
            f"{path}: refused to unpickle '{what}': kdlab reads only tensors and plain containers, never code{hint}"
        ) from None
    except KdlabError:
        raise
    except Exception as err:  # zip/legacy parsing errors of non-PyTorch files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None


def _number(value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def read_checkpoint(path: str | Path) -> Imported:
    """Read a zoo checkpoint safely and return its state dict (``model`` entry, or the file itself)."""
    obj = safe_torch_load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict, got {type(obj).__name__}")
    info = {k: v for k in ("epoch", "best_acc", "accuracy") if (v := _number(obj.get(k))) is not None}
    key = next((k for k in _STATE_KEYS if isinstance(obj.get(k), dict)), None)
    if key is not None:
        state = obj[key]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, key = obj, None
    else:
        raise CheckpointError(
            f"{path}: no state dict found (looked for keys {', '.join(map(repr, _STATE_KEYS))}; "
            f"the file has {', '.join(map(repr, list(obj)[:8]))})"
        )
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state dict entry '{bad}' is a {type(state[bad]).__name__}, not a tensor")
    fmt = "state_dict" if key is None else f"dict['{key}']"
    return Imported(dict(state), fmt, info)


def _candidates(state: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Interpretations of a state dict's key prefixes, most literal first."""
    out = [("", state)]
    for prefix in ("module.student.", "student.", "module."):
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            out.append((prefix, sub))
    return out


def student_state(state: dict[str, torch.Tensor], expected: list[str]) -> tuple[str, dict[str, torch.Tensor]]:
    """Pick the prefix interpretation whose keys are exactly ``expected`` (else the closest one).

    Handles plain state dicts, ``DataParallel`` (``module.``) and mdistiller distillers (``module.student.``; the
    teacher's and the connectors' entries are dropped).
    """
    want = set(expected)
    best = max(_candidates(state), key=lambda c: (len(want & set(c[1])), -len(set(c[1]) - want)))
    for prefix, sub in _candidates(state):
        if set(sub) == want:
            return prefix, sub
    return best


TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
"""File suffixes read as PyTorch pickles (weights-only); anything else is read as safetensors."""


def read_weights(path: str | Path, expected: list[str]) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: kdlab safetensors, or a PyTorch file (``.pth``…) read weights-only.

    A PyTorch file may be a plain state dict (torchvision's ``resnet34-b627a593.pth``), a ``{'model': …}`` /
    ``{'state_dict': …}`` dict or a ``DataParallel`` / mdistiller state; the prefix whose keys are ``expected`` is
    used (:func:`student_state`). BatchNorm ``num_batches_tracked`` counters, absent from torchvision's older files,
    are filled with 0 (what ``nn.BatchNorm2d`` itself does for such files).
    """
    from kdlab.engine import checkpoint as ck

    if Path(path).suffix.lower() not in TORCH_SUFFIXES:
        return ck.load_weights_file(path)
    return fill_bn_counters(student_state(read_checkpoint(path).state, expected)[1], expected)


def fill_bn_counters(state: dict[str, torch.Tensor], expected: list[str]) -> dict[str, torch.Tensor]:
    """``state`` plus the BatchNorm ``num_batches_tracked`` entries of ``expected`` it lacks (as 0)."""
    state = dict(state)
    for key in expected:
        stem = key.removesuffix("num_batches_tracked")
        if key.endswith(".num_batches_tracked") and key not in state and f"{stem}running_mean" in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    return state


def convert(path: str | Path, arch: str, out: str | Path, *, overwrite: bool = False,
            num_classes: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Convert a RepDistiller / mdistiller checkpoint of ``arch`` to ``out`` (safetensors); returns a summary.

    Nothing is written unless the weights load strictly into ``arch``; ``out`` is never replaced without
    ``overwrite``.
    """
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    out = check_output_file(out, overwrite)  # before the checkpoint is read
    imported = read_checkpoint(path)
    model = build(arch, num_classes=num_classes or 100)
    expected = list(model.state_dict())
    prefix, state = student_state(imported.state, expected)
    state = fill_bn_counters(state, expected)
    cls_key = f"{getattr(model, 'classifier_name', 'fc')}.weight"
    if num_classes is None and cls_key in state and state[cls_key].dim() == 2 and state[cls_key].shape[0] != 100:
        model = build(arch, num_classes=int(state[cls_key].shape[0]))
    ck.load_into(model, state, arch, f"{path}")
    weights = model.state_dict()
    n_classes = int(weights[cls_key].shape[0]) if cls_key in weights else None
    meta = {"kdlab.arch": arch, "kdlab.source": Path(path).name, "kdlab.source_format": imported.source_format}
    meta.update({f"kdlab.{k}": str(v) for k, v in imported.info.items()})
    if prefix:
        meta["kdlab.source_prefix"] = prefix
    out.parent.mkdir(parents=True, exist_ok=True)
    sha = ck.save_weights(out, weights, metadata=meta)
    return {
        "source": str(path), "out": str(out), "arch": arch, "num_classes": n_classes, "tensors": len(weights),
        "prefix": prefix, "sha256": sha, **imported.info,
    }  # fmt: skip
