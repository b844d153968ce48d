"""A run's account of itself: the best epoch so far, the time and images spent, the teacher's accuracy.

:class:`RunRecord` is carried through the epochs, saved into every checkpoint's metadata (:meth:`RunRecord.meta`),
restored on ``--resume`` (:meth:`RunRecord.restore`), and turned into ``summary.json`` at the end
(:meth:`RunRecord.summary`). The split that picks the best epoch (``best.safetensors``) is the first evaluated one:
``test``, or ``val`` when the test split is closed (tuning); the other split's best is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlab.config import RunConfig


@dataclass
class RunRecord:
    select_on: str  # the split choosing the best epoch
    best_acc: float = -1.0
    best_epoch: int = 0
    best_top5: float | None = None
    best_val: list[Any] = field(default_factory=lambda: [-1.0, None, 0])  # (acc, top-5, epoch) when val != select_on
    wall: float = 0.0
    images: int = 0
    train_time: float = 0.0
    teacher_acc: float | None = None
    teacher_top5: float | None = None

    @classmethod
    def restore(cls, select_on: str, meta: dict[str, Any]) -> RunRecord:
        """The record a checkpoint's metadata holds (written by :meth:`meta`)."""
        return cls(
            select_on, best_acc=meta["best_acc"], best_epoch=meta["best_epoch"], best_top5=meta.get("best_top5"),
            best_val=meta.get("best_val", [-1.0, None, 0]), wall=meta["wall_time_s"], images=meta["train_images"],
            train_time=meta["train_time_s"], teacher_acc=meta["teacher_acc"], teacher_top5=meta.get("teacher_top5"),
        )  # fmt: skip

    def meta(self, **extra: Any) -> dict[str, Any]:
        """Checkpoint metadata (``extra``: the world size, the integrity record)."""
        return dict(
            best_acc=self.best_acc, best_epoch=self.best_epoch, wall_time_s=self.wall, train_images=self.images,
            train_time_s=self.train_time, teacher_acc=self.teacher_acc, **extra, best_top5=self.best_top5,
            teacher_top5=self.teacher_top5, best_val=self.best_val,
        )  # fmt: skip

    def observe(self, epoch: int, evals: dict[str, dict[str, float]], seconds: float, train_seconds: float,
                images: int) -> bool:  # fmt: skip
        """Account for a finished epoch (its evaluations per split, wall and training seconds, images trained on);
        whether it is the best so far on :attr:`select_on` (a method's pre-phase, epochs ≤ 0, never is)."""
        val = evals.get("val")
        if self.select_on != "val" and val is not None and epoch > 0 and val["acc"] > self.best_val[0]:
            self.best_val = [val["acc"], val["top5"], epoch]
        self.wall += seconds
        self.train_time += train_seconds
        self.images += images
        ev = evals[self.select_on]
        improved = epoch > 0 and ev["acc"] > self.best_acc
        if improved:
            self.best_acc, self.best_epoch, self.best_top5 = ev["acc"], epoch, ev["top5"]
        return improved

    def summary(self, cfg: RunConfig, finals: dict[str, dict[str, float]], **fields: Any) -> dict[str, Any]:
        """``summary.json``: the run's identity, final and best accuracies per split, speed, then ``fields``
        (parameter count, device, world size, environment)."""
        test = self.select_on == "test"
        final = finals.get("test", {})
        summary: dict[str, Any] = {
            "model": cfg.model.name,
            "method": cfg.method.name,
            "teacher": cfg.teacher.name if cfg.teacher else None,
            "teacher_test_acc": self.teacher_acc if test else None,
            "teacher_test_top5": self.teacher_top5 if test else None,
            "dataset": cfg.data.name,
            "seed": cfg.seed,
            "epochs": cfg.train.epochs,
            "final_test_acc": final.get("acc"),
            "final_test_top5": final.get("top5"),
            "best_test_acc": self.best_acc if test else None,
            "best_test_top5": self.best_top5 if test else None,  # of the best-top-1 epoch (best.safetensors)
            "best_epoch": self.best_epoch,
            "wall_time_s": round(self.wall, 2),
            "train_images_per_s": round(self.images / self.train_time, 1) if self.train_time else None,
            **fields,
        }
        if "val" in finals:  # which split each number used: test_* never saw tuning, val_* is held out of train
            best_val = self.best_val
            if self.select_on == "val":
                best_val = [self.best_acc, self.best_top5, self.best_epoch]
                summary.update(teacher_val_acc=self.teacher_acc, teacher_val_top5=self.teacher_top5)
            summary.update(final_val_acc=finals["val"]["acc"], final_val_top5=finals["val"]["top5"],
                           best_val_acc=best_val[0], best_val_top5=best_val[1], best_val_epoch=best_val[2])
            summary["selected_on"] = self.select_on
        return summary
