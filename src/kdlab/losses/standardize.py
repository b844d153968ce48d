"""Logit standardization: the Z-score pre-process of logit-standardization-in-kd.md and its Table 4 ablation.

Every function works per row (the last dimension holds the K classes) and keeps the gradient through the row mean
and standard deviation, so a student trained through it is free in its logit range (Sec. 4.3: the loss is invariant
to adding a constant to, or multiplying by a positive number, the student's logits).

Paper vs. released code (both available here):

* Algorithm 1 of the paper: ``σ = sqrt(mean((x − x̄)²))`` (``ddof=0``), no epsilon → ``zscore(x, ddof=0, eps=0)``.
* The authors' release (``normalize`` in ``mdistiller/distillers/{KD,DKD,MLKD}.py`` of logit-standardization-KD):
  ``(x − x̄) / (1e-7 + x.std())`` with ``torch.std``'s default ``ddof=1`` → ``zscore(x)`` (the default). The
  temperature is applied afterwards by the loss (``softmax(Z(x) / τ)``), which equals Algorithm 1's ``Z(x; τ)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

StandardizeMode = Literal["zscore", "center", "scale"]
# What every logit loss accepts as ``standardize=``: a mode name, any callable row transform, or None (identity).
Standardize = StandardizeMode | Callable[[torch.Tensor], torch.Tensor] | None


def logit_std(logits: torch.Tensor, ddof: int = 1) -> torch.Tensor:
    """Per-row standard deviation ``sqrt(Σ (x − x̄)² / (K − ddof))``, shape ``(..., 1)``.

    Equal to ``logits.std(-1, correction=ddof, keepdim=True)`` but with a finite gradient for constant rows: the
    variance is clamped at the smallest normal float, which changes the value only where ``var < 1e-38`` (float32).
    """
    k = logits.shape[-1]
    if k - ddof <= 0:
        raise ValueError(f"standard deviation over {k} class(es) with ddof={ddof} is undefined")
    centered = logits - logits.mean(dim=-1, keepdim=True)
    var = centered.square().sum(dim=-1, keepdim=True) / (k - ddof)
    return var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


def zscore(logits: torch.Tensor, temperature: float = 1.0, ddof: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """Weighted Z-score ``(z − z̄) / (σ(z) + eps) / τ`` per row (logit-standardization-in-kd.md, Algorithm 1).

    Defaults (``ddof=1``, ``eps=1e-7``) match the authors' released ``normalize``; ``ddof=0, eps=0`` is Algorithm 1
    exactly. With ``ddof=0, eps=0`` the output has zero mean, standard deviation ``1/τ`` and lies in
    ``[−√(K−1)/τ, √(K−1)/τ]`` (Sec. 4.3). Constant rows map to zeros (finite value and gradient).
    """
    centered = logits - logits.mean(dim=-1, keepdim=True)
    return centered / (logit_std(logits, ddof) + eps) / temperature


def center(logits: torch.Tensor, ddof: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """``z − z̄`` per row (the "z − z̄" column of Table 4, logit-standardization-in-kd.md)."""
    return logits - logits.mean(dim=-1, keepdim=True)


def scale(logits: torch.Tensor, ddof: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """``z / (σ(z) + eps)`` per row (the "z / σ(z)" column of Table 4, logit-standardization-in-kd.md)."""
    return logits / (logit_std(logits, ddof) + eps)


def _zscore(logits: torch.Tensor, ddof: int = 1, eps: float = 1e-7) -> torch.Tensor:
    return zscore(logits, 1.0, ddof, eps)


STANDARDIZERS: dict[str, Callable[..., torch.Tensor]] = {"zscore": _zscore, "center": center, "scale": scale}


def standardize(logits: torch.Tensor, mode: Standardize = None, ddof: int = 1, eps: float = 1e-7) -> torch.Tensor:
    """Apply a standardization ``mode`` to logits (Table 4 of logit-standardization-in-kd.md).

    ``None`` → ``z`` (plain KD), ``"center"`` → ``z − z̄``, ``"scale"`` → ``z/σ``, ``"zscore"`` → ``(z − z̄)/σ``; a
    callable is applied as is (e.g. ``functools.partial(zscore, ddof=0, eps=0)`` for Algorithm 1 exactly).
    ``ddof``/``eps`` configure σ for the named modes.
    """
    if mode is None:
        return logits
    if callable(mode):
        return mode(logits)
    try:
        fn = STANDARDIZERS[mode]
    except KeyError:
        raise ValueError(f"unknown standardize mode {mode!r}; choose one of {sorted(STANDARDIZERS)} or None") from None
    return fn(logits, ddof=ddof, eps=eps)
