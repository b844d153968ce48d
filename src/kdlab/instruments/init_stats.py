"""Logit mean at initialisation over random seeds (kd-vs-logit-matching Table 1, Proposition 1).

For each seed a fresh model of the zoo is built (``torch.manual_seed(seed)`` then ``kdlab.models.build``) and run on
real inputs; its logit mean — the average of all logits over the samples and classes — is recorded. Proposition 1
predicts a zero expectation for zero-mean initialised weights, which makes teacher and student "equal-mean
initialised", the condition under which KD with T → ∞ equals logit matching. The paper averages 6,000 seeds.

The global random state is saved and restored, so measuring does not disturb a run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.errors import KdlabError


@dataclass
class InitLogitMean:
    model: str
    per_seed: list[float]  # logit mean of each seed's freshly initialised model
    mean: float  # average over seeds (Table 1's number)
    std: float  # standard deviation over seeds (ddof 1)
    sem: float  # standard error of ``mean``
    mean_abs: float  # average |logit mean| over seeds
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "seeds": len(self.per_seed), "mean": self.mean, "std": self.std, "sem": self.sem,
            "mean_abs": self.mean_abs, "mode": self.mode, "per_seed": self.per_seed,
        }  # fmt: skip


def init_logit_mean(
    model_name: Any,
    num_classes: int,
    inputs: torch.Tensor,
    seeds: Iterable[int] = range(10),
    mode: str = "eval",
    device: torch.device | str = "cpu",
) -> InitLogitMean:
    """Logit mean of ``model_name`` at initialisation on ``inputs`` (model inputs, already transformed) per seed.

    ``model_name`` is a registered name or a model config section (``cfg.model``: user models, constructor kwargs).

    ``mode`` is ``"eval"`` (batch norm uses its initial running statistics) or ``"train"`` (batch statistics, as in
    the first training step).
    """
    from kdlab.models import build

    if mode not in ("eval", "train"):
        raise KdlabError(f"mode must be 'eval' or 'train', got '{mode}'")
    seeds = list(seeds)
    if not seeds:
        raise KdlabError("init_logit_mean needs at least one seed")
    values: list[float] = []
    x = inputs.to(device)
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(int(seed))
            model = build(model_name, num_classes=num_classes).to(device)
            model.train(mode == "train")
            with torch.inference_mode():
                values.append(float(model(x).double().mean()))
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return InitLogitMean(
        str(getattr(model_name, "name", model_name)), values, mean, std, std / math.sqrt(n), sum(abs(v) for v in values) / n, mode
    )
