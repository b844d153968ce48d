"""Multi-level logit distillation (MLKD) as a method, on the single augmented view the engine provides."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from kdlab import losses as L
from kdlab.losses.mlkd import DEFAULT_TEMPERATURES
from kdlab.methods.base import METHODS, Method
from kdlab.methods.logit import StandardizeParams, standardizer
from kdlab.models.base import ModelOutput


class MLKDParams(StandardizeParams):
    temperatures: list[float] = Field(
        list(DEFAULT_TEMPERATURES),
        min_length=1,
        description="temperatures of every level; the first is the base T (release: [T, 3, 5, 2, 6], T = 4)",
    )
    ce_weight: float = Field(0.1, ge=0, description="weight of the cross-entropy term (per view)")
    kd_weight: float = Field(0.9, ge=0, description="weight of the instance-level terms, and of the batch/class "
                             "terms unless set (published runs: 9 on all three)")
    batch_weight: float | None = Field(None, ge=0, description="weight of the batch-level term (default: kd_weight)")
    class_weight: float | None = Field(None, ge=0, description="weight of the class-level term (default: kd_weight; "
                                       "it grows like (B/K)², lower it for few classes)")
    mask_mode: Literal["release", "per_sample", "none"] = Field(
        "release",
        description="confidence masks: release = scalar × mean(mask) as released, per_sample = per-sample/column "
        "masking (the release's commented-out reduce=False), none",
    )
    release_quirks: bool = Field(
        True, description="keep the release's strong-view KD term that uses weak-view logits at T = 2 and 6"
    )

    @field_validator("temperatures")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(t <= 0 for t in v):
            raise ValueError("temperatures must be positive")
        return v


@METHODS.register("mlkd")
class MLKD(Method):
    """Multi-level logit distillation (Jin et al., CVPR 2023), objective of the authors' release
    (:func:`kdlab.losses.mlkd_terms`): CE + instance-level KD at several temperatures + batch-level (B×B) and
    class-level (K×K) prediction-correlation alignment with teacher-confidence masks.

    The release trains on a weak and a strong augmentation of each image; so does kdlab (``views = 2``: the engine
    passes the strong view's student and teacher outputs as ``strong``; the strong augmentation is the transform's
    ``strong_batch``: for images the release's RandAugment(2, 10) + Cutout policy as batched tensor operations on
    the device, ``data.strong_augment``, :mod:`kdlab.data.strong`). Called without ``strong``
    (e.g. from a user's own loop) the weak view serves as both. ``standardize`` acts on the instance-level terms, as the release's
    ``logit_stand`` (recipe there: base temperature 2, KD weight 9).
    """

    Params = MLKDParams
    views = 2

    def losses(
        self, student: ModelOutput, teacher: ModelOutput | None, target: torch.Tensor, epoch: int,
        strong: tuple[ModelOutput, ModelOutput] | None = None, **_: object,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        p = self.params
        assert teacher is not None
        s_strong, t_strong = (strong[0].logits, strong[1].logits) if strong is not None else (None, None)
        return L.mlkd_terms(
            student.logits, teacher.logits, target, s_strong, t_strong, p.temperatures, p.ce_weight, p.kd_weight,
            standardizer(p), p.mask_mode, p.release_quirks, p.batch_weight, p.class_weight,
        )  # fmt: skip
