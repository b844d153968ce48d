"""What a run shows while it trains: the progress bar's running losses and the one-line summary of each epoch.

The bar's postfix is the running mean of the loss and of every loss term since the start of the epoch. It is read
from the loop's on-device sums only every :data:`REFRESH_EVERY` steps (one host transfer for all terms), so a GPU
run does not wait for the device at every step. Only the process that owns the bar (rank 0) ever shows it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the Slurm launcher reads EPOCH_LINE without importing torch
    import torch

REFRESH_EVERY = 20
"""Steps between two updates of the bar's running losses."""


def show_running_losses(bar: Any, step: int, sums: Mapping[str, torch.Tensor], seen: int) -> None:
    """Set the bar's postfix to the running means ``sums[k] / seen`` every :data:`REFRESH_EVERY` steps (and at
    step 0); ``sums`` holds sample-weighted totals (``loss`` and one entry per term)."""
    if getattr(bar, "disable", True) or not sums or not seen or (step % REFRESH_EVERY and step != 0):
        return
    names = sorted(sums, key=lambda k: (k != "loss", k))
    import torch

    values = torch.stack([sums[k].detach().float().reshape(()) for k in names]).tolist()  # one host sync
    bar.set_postfix({k: f"{v / seen:.4g}" for k, v in zip(names, values)}, refresh=False)


EPOCH_LINE = re.compile(r"^epoch -?\d+/\d+  ", re.MULTILINE)
"""Finds the lines :func:`epoch_line` writes in a log (one per finished epoch; pre-phase epochs are 0 or negative)."""


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    """``epoch 3/40  loss 0.4123 (ce 0.0412 kd 0.3711)  train 91.20%  test 88.40%  lr 0.05  5123 img/s``."""
    terms = sorted(k[6:] for k in row if k.startswith("train_") and k not in ("train_loss", "train_acc"))
    detail = " (" + " ".join(f"{t} {row['train_' + t]:.4g}" for t in terms) + ")" if len(terms) > 1 else ""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['train_loss']:.4f}{detail}", f"train {row['train_acc']:.2f}%"]
    for split in ("test", "val"):  # whichever the run evaluates (data.read_test, data.val_split)
        if f"{split}_acc" in row:
            top5 = row.get(f"{split}_top5")
            parts.append(f"{split} {row[f'{split}_acc']:.2f}%" + (f" (top-5 {top5:.2f}%)" if top5 is not None else ""))
    parts += [f"lr {row['lr']:.4g}", f"{row['images_per_s']:.0f} img/s"]
    return "  ".join(parts)
