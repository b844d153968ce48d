"""The training loop shared by ``kdlab train`` (labels only) and ``kdlab distill`` (frozen teacher + method).

Everything random in a run is a pure function of ``(seed, purpose, epoch)``: initialisation, the shuffle order and
the augmentation of every epoch. A checkpoint is written after every epoch, so ``resume`` restarts the interrupted
epoch from the last finished one and ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from kdlab.config import RunConfig, save_config
from kdlab.data import Dataset, batches, build_dataset
from kdlab.data.loader import num_batches
from kdlab.engine import checkpoint as ck
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.callbacks import CALLBACKS, Callback
from kdlab.engine.distributed import DistInfo, init_distributed, shard
from kdlab.engine.evaluation import evaluate_split
from kdlab.engine.fastpath import FastPath
from kdlab.engine.optim import build_optimizer
from kdlab.engine.resume import check_same_config
from kdlab.engine.rundir import MetricsLog, check_out_dir, clear_run
from kdlab.engine.schedule import lr_at
from kdlab.engine.teacher_cache import TeacherCache
from kdlab.engine.teachers import load_teacher, teacher_fingerprint
from kdlab.errors import ConfigError, KdlabError
from kdlab.methods import Method, build_method
from kdlab.models import ModelOutput, build, num_params
from kdlab.seeding import derive_seed, seed_everything


class NonFiniteLossError(KdlabError):
    """Training produced a NaN or infinite loss."""


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    return dev


def _features(model: nn.Module, x: torch.Tensor) -> ModelOutput:
    return model.forward_features(x)  # type: ignore[operator]


class Objective(nn.Module):
    """Student + method as one module, so that DistributedDataParallel syncs the gradients of both."""

    def __init__(self, student: nn.Module, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method

    def forward(
        self, x: torch.Tensor, teacher: ModelOutput | None, target: torch.Tensor, epoch: int,
        x_strong: torch.Tensor | None = None, teacher_strong: ModelOutput | None = None,
    ) -> tuple[ModelOutput, dict[str, torch.Tensor]]:  # fmt: skip
        s_out = _features(self.student, x)
        if x_strong is None:
            return s_out, self.method.losses(s_out, teacher, target, epoch)
        strong = (_features(self.student, x_strong), teacher_strong)  # separate forwards, as two-view methods do
        return s_out, self.method.losses(s_out, teacher, target, epoch, strong=strong)


class Trainer:
    """Prepares a run (validating everything before touching the output folder) and runs it.

    ``dataset``, ``student`` and ``teacher`` may be passed in to reuse objects across runs (the demo does);
    otherwise they are built from the config.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        dataset: Dataset | None = None,
        teacher: nn.Module | None = None,
        callbacks: list[Callback] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        log = log or (lambda msg: None)
        self.log = lambda msg: log(msg) if self.dist.is_main else None
        self.dist: DistInfo = init_distributed(cfg.train.device)
        check_out_dir(self.out, resume=resume, overwrite=overwrite)
        if resume:
            check_same_config(cfg, self.out)
        self._setup_device()
        self.method: Method = build_method(cfg.method.name, cfg.method.params())
        if self.method.needs_teacher and cfg.teacher is None:
            raise ConfigError(f"method '{cfg.method.name}' needs a teacher: set teacher.name and teacher.checkpoint")
        data = dataset if dataset is not None else build_dataset(cfg.data)
        self.data = data.to(self.device)
        self._build_models(teacher)
        self._setup_teacher_cache()
        example = self.data.transform.eval_batch(self.data.train.x[:2])
        self.method.setup(self.student, self.teacher, example)
        self.method.to(self.device)
        self._setup_fast_path(example)
        self.optimizer = build_optimizer(cfg.optim, list(self.student.parameters()) + list(self.method.parameters()))
        self.callbacks = [CALLBACKS.get(name)() for name in cfg.instruments] + list(callbacks or [])
        for cb in self.callbacks:
            cb.setup(self)  # validation only: nothing on disk has been touched yet
        self.dist.barrier()  # every rank has validated before rank 0 touches the folder
        if overwrite and self.dist.is_main:
            clear_run(self.out)

    def _setup_device(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = select_device(cfg.train.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.train.batch_size < self.dist.world:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is smaller than the {self.dist.world} processes")

    def _build_models(self, teacher: nn.Module | None) -> None:
        """The student (seeded initialisation) and, for methods that read one, the frozen teacher."""
        cfg = self.cfg
        seed_everything(derive_seed(cfg.seed, "init"))
        self.student = build(cfg.model, num_classes=self.data.num_classes).to(self.device)
        self.teacher: nn.Module | None = None
        if self.method.needs_teacher:
            assert cfg.teacher is not None
            if cfg.teacher.ensemble and set(self.method.teacher_outputs) - {"logits"}:
                raise ConfigError(f"method '{cfg.method.name}' needs teacher features; an ensemble teacher gives logits only")
            if teacher is None:
                teacher = load_teacher(cfg.teacher, self.data.num_classes)
            self.teacher = teacher.to(self.device)
            self.teacher.eval().requires_grad_(False)

    def _setup_teacher_cache(self) -> None:
        """Replay the teacher's outputs from ``teacher.cache`` when set (checked against data, teacher and method)."""
        cfg = self.cfg
        self.cache: TeacherCache | None = None
        self.augment_seed = cfg.seed if cfg.data.augment_seed is None else cfg.data.augment_seed
        if self.teacher is None or cfg.teacher is None or not cfg.teacher.cache:
            return
        self.cache = TeacherCache(cfg.teacher.cache, self.device)
        self.cache.check(self.data, teacher_fingerprint(cfg.teacher), self.method.teacher_outputs)
        if cfg.data.augment_seed not in (None, self.cache.info.augment_seed):
            raise ConfigError(
                f"data.augment_seed={cfg.data.augment_seed} but the teacher cache was made with "
                f"augment seed {self.cache.info.augment_seed}"
            )
        self.augment_seed = self.cache.info.augment_seed
        if self.method.views > 1:
            raise ConfigError(f"method '{cfg.method.name}' trains on two views; a teacher cache holds one per epoch")

    def _setup_fast_path(self, example: torch.Tensor) -> None:
        """Memory format, autocast, DDP wrapping and compile of the student step and the teacher forward."""
        self.fast = FastPath(self.cfg.train, self.device, example)
        self.fast.prepare(self.student, self.teacher, self.method)
        self.channels_last = self.fast.channels_last
        self.scaler = self.fast.scaler
        self._autocast = self.fast.autocast
        self._teacher_fwd = self.teacher.forward_features if self.teacher is not None else None  # type: ignore[union-attr]
        self.objective: nn.Module = Objective(self.student, self.method)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = DDP(self.objective, device_ids=ids, find_unused_parameters=any(
                True for _ in self.method.parameters()))  # fmt: skip
        self.objective = self.fast.maybe_compile(self.objective)  # type: ignore[assignment]
        if self._teacher_fwd is not None:
            self._teacher_fwd = self.fast.maybe_compile(self._teacher_fwd)

    # ----------------------------------------------------------------------------------------------------------------

    def _state(self, epoch: int, extra: dict[str, Any]) -> ck.TrainState:
        tensors = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        tensors.update({f"method.{k}": v for k, v in self.method.state_dict().items()})
        opt_tensors, opt_meta = ck.optimizer_to_state(self.optimizer)
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        return ck.TrainState(tensors, dict(extra, optimizer=opt_meta))

    def _restore(self, state: ck.TrainState) -> None:
        t = state.tensors
        self.student.load_state_dict({k[8:]: v for k, v in t.items() if k.startswith("student.")})
        self.method.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("method.")})
        ck.optimizer_from_state(self.optimizer, t, state.meta["optimizer"])
        torch.set_rng_state(t["rng.torch"])

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Top-1 accuracy (%) and cross-entropy of the method's test-time prediction on a split."""
        self.student.eval()
        return evaluate_split(
            lambda x: self.method.predict(_features(self.student, x)), getattr(self.data, split),
            self.data.transform, self.cfg.train.eval_batch_size,
        )  # fmt: skip

    @torch.inference_mode()
    def _teacher_forward(self, x: torch.Tensor) -> ModelOutput:
        assert self._teacher_fwd is not None
        with self._autocast():
            return self._teacher_fwd(x)

    def teacher_outputs(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> ModelOutput:
        """The teacher's outputs for a training batch: replayed from the cache, or a live forward."""
        if self.cache is not None:
            return self.cache.outputs(epoch, index)
        out = self._teacher_forward(x)
        needed = self.method.teacher_outputs
        # leave inference mode: clone what the method reads, drop the rest
        return ModelOutput(*(t.clone() if (f in needed and t is not None) else None
                             for f, t in zip(ModelOutput._fields, out)))  # fmt: skip

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at(epoch, cfg.optim.lr, cfg.train.epochs, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # dropout etc.: a function of (seed, epoch, rank) too
        torch.manual_seed(derive_seed(cfg.seed, "epoch", epoch, *([self.dist.rank] if self.dist.enabled else [])))
        self.objective.train()
        dev = self.device
        sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=dev)
        first_bad = torch.full((), -1, dtype=torch.long, device=dev)  # first step with a non-finite loss
        n, bsz, world = len(self.data.train), cfg.train.batch_size, self.dist.world
        total = num_batches(n, bsz)
        if world > 1 and 0 < n % bsz < world:
            total -= 1  # a last global batch smaller than the number of ranks is dropped (some ranks would be empty)
        it = batches(
            self.data.train, self.data.transform, bsz, train=True, seed=cfg.seed, epoch=epoch,
            shard=(lambda idx: shard(idx, self.dist)) if self.dist.enabled else None, augment_seed=self.augment_seed,
            augment_epoch=self.cache.augment_epoch(epoch) if self.cache is not None else epoch,
        )  # fmt: skip
        bar = tqdm(
            it, total=total, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
            disable=not (cfg.train.progress and self.dist.is_main), dynamic_ncols=True,
        )  # fmt: skip
        seen = 0
        for step, (x, y, idx) in enumerate(bar):
            if step >= total:
                break
            global_n = min(bsz, n - step * bsz)
            uses_teacher = self.teacher is not None and self.method.teacher_outputs
            t_out = self.teacher_outputs(x, idx, epoch) if uses_teacher else None
            views: tuple = ()
            if self.method.views == 2:  # a strong view of the same samples (MLKD)
                xs = self.data.transform.strong_batch(self.data.train.x[idx], idx, self.augment_seed, epoch)
                views = (xs, self.teacher_outputs(xs, idx, epoch) if uses_teacher else None)
            with self._autocast():
                s_out, terms = self.objective(x, t_out, y, epoch, *views)
                loss = sum(terms.values())
            assert isinstance(loss, torch.Tensor)
            # DDP averages gradients over ranks; weighting by the local share makes that the global-batch mean
            scaled = loss * (len(y) * world / global_n) if world > 1 else loss
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                scaled.backward()
                self.optimizer.step()
            with torch.no_grad():
                bs = len(y)
                seen += bs
                for k, v in terms.items():
                    sums[k] = sums.get(k, torch.zeros((), device=dev)) + v.detach() * bs
                sums["loss"] = sums.get("loss", torch.zeros((), device=dev)) + loss.detach() * bs
                correct += (s_out.logits.argmax(1) == y).sum()
                bad = ~torch.isfinite(loss.detach()) & (first_bad < 0)
                first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)
            if dev.type == "cpu" or step % 50 == 49:  # free on CPU; on GPUs a sync only every 50 steps
                if int(first_bad) >= 0:
                    self._raise_non_finite(terms, epoch, int(first_bad))
        if int(first_bad) >= 0:
            self._raise_non_finite(terms, epoch, int(first_bad))
        keys = sorted(sums)
        packed = self.dist.all_reduce_sum(torch.stack([sums[k] for k in keys] + [correct, torch.tensor(float(seen), device=dev)]))
        seen_all = float(packed[-1])
        out = {f"train_{k}": float(v) / seen_all for k, v in zip(keys, packed[:-2])}
        out["train_acc"] = 100.0 * float(packed[-2]) / seen_all
        out["lr"] = lr
        return out

    def _raise_non_finite(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        bad = next((k for k, v in terms.items() if not torch.isfinite(v).all()), "loss")
        raise NonFiniteLossError(
            f"non-finite loss (term '{bad}') at epoch {epoch}, step {step}; "
            f"stopped, the last good checkpoint is kept in {self.out / 'checkpoints'}"
        )

    # ----------------------------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, main = self.cfg, self.dist.is_main
        ckpt_dir = self.out / "checkpoints"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(self.out)
        start, best_acc, best_epoch, wall, imgs, train_time = 0, -1.0, 0, 0.0, 0, 0.0
        teacher_acc = None
        state = ck.load_latest(ckpt_dir) if self.resume else None
        if state is not None:
            self._restore(state)
            m = state.meta
            start, best_acc, best_epoch = m["epoch"], m["best_acc"], m["best_epoch"]
            wall, imgs, train_time, teacher_acc = m["wall_time_s"], m["train_images"], m["train_time_s"], m["teacher_acc"]
            self.log(f"resuming {self.out} after epoch {start}")
        else:
            if main:
                save_config(cfg, self.out / "config.yaml")
            if self.teacher is not None:
                teacher_acc = self._teacher_accuracy()
                self.log(f"teacher {cfg.teacher.name} test accuracy {teacher_acc:.2f}%")  # type: ignore[union-attr]
        if main:
            metrics.restore(start)
        for cb in self.callbacks:
            cb.on_train_start(self)
        for epoch in range(start + 1, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch}
            row.update(self.train_epoch(epoch))
            t_train = time.perf_counter() - t0
            ev = self.evaluate("test")
            row.update(test_acc=ev["acc"], test_loss=ev["loss"])
            for cb in self.callbacks:
                row.update(cb.on_epoch_end(self, epoch))
            dt = time.perf_counter() - t0
            wall += dt
            train_time += t_train
            imgs += len(self.data.train)
            row.update(epoch_time_s=round(dt, 3), images_per_s=round(len(self.data.train) / t_train, 1))
            improved = ev["acc"] > best_acc
            if improved:
                best_acc, best_epoch = ev["acc"], epoch
            if main:
                if improved:
                    ck.save_weights(self.out / "best.safetensors", self.student.state_dict())
                metrics.append(row)
                meta = dict(
                    best_acc=best_acc, best_epoch=best_epoch, wall_time_s=wall, train_images=imgs,
                    train_time_s=train_time, teacher_acc=teacher_acc, world_size=self.dist.world,
                )  # fmt: skip
                ck.save_train_state(ckpt_dir, epoch, self._state(epoch, meta), keep=cfg.train.keep_checkpoints)
            self.dist.barrier()
            self.log(
                f"epoch {epoch}/{cfg.train.epochs}  loss {row['train_loss']:.4f}  train {row['train_acc']:.2f}%  "
                f"test {ev['acc']:.2f}%  lr {row['lr']:.4g}  {row['images_per_s']:.0f} img/s"
            )
        final = self.evaluate("test")
        summary = {
            "model": cfg.model.name,
            "method": cfg.method.name,
            "teacher": cfg.teacher.name if cfg.teacher else None,
            "teacher_test_acc": teacher_acc,
            "dataset": cfg.data.name,
            "seed": cfg.seed,
            "epochs": cfg.train.epochs,
            "final_test_acc": final["acc"],
            "best_test_acc": best_acc,
            "best_epoch": best_epoch,
            "num_params": num_params(self.student),
            "wall_time_s": round(wall, 2),
            "train_images_per_s": round(imgs / train_time, 1) if train_time else None,
            "device": str(self.device),
            "world_size": self.dist.world,
        }
        if self.data.noisy_indices is not None:
            summary["label_noise"] = {"fraction": cfg.data.label_noise, "seed": cfg.data.label_noise_seed,
                                      "flipped": len(self.data.noisy_indices)}  # fmt: skip
        if main:
            ck.save_weights(self.out / "model.safetensors", self.student.state_dict())
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        self.dist.barrier()
        return RunResult(self.out, summary)

    def _teacher_accuracy(self) -> float:
        return evaluate_split(
            lambda x: self._teacher_forward(x).logits, self.data.test, self.data.transform, self.cfg.train.eval_batch_size
        )["acc"]


def run(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False, **kwargs: Any
) -> RunResult:
    """Train (or distill, when the method needs a teacher) as described by ``cfg``; returns the run summary."""
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, **kwargs).run()
