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

from kdlab import environment
from kdlab.config import RunConfig, save_config
from kdlab.data import DataSource, build_dataset
from kdlab.data.loader import num_batches
from kdlab.engine import checkpoint as ck
from kdlab.engine.atomic import atomic_write_text
from kdlab.engine.callbacks import CALLBACKS, Callback
from kdlab.engine.distributed import DistInfo, init_distributed, shard, sync_batchnorm
from kdlab.engine.evaluation import evaluate_split
from kdlab.engine.fastpath import FastPath
from kdlab.engine.meter import StepMeter
from kdlab.engine.objective import (
    Objective,
    check_model_fits_data,
    features,
    select_device,
)
from kdlab.engine.optim import build_optimizer, set_epoch_hyperparameters
from kdlab.engine.progress import epoch_line, show_running_losses
from kdlab.engine.record import RunRecord
from kdlab.engine.resume import (
    check_cache_inputs,
    check_same_config,
    extend_epochs,
    integrity_record,
    load_resume_state,
)
from kdlab.engine.rundir import MetricsLog, check_out_dir, clear_run, open_run_folder
from kdlab.engine.schedule import lr_at
from kdlab.engine.teacher_cache import TeacherCache, cache_refusal
from kdlab.engine.teachers import load_teacher, teacher_fingerprint
from kdlab.engine.trackers import build_trackers
from kdlab.errors import ConfigError, KdlabError, warn
from kdlab.methods import Method, build_method
from kdlab.models import ModelOutput, build, num_params
from kdlab.models.output import keep_fields
from kdlab.seeding import derive_seed, seed_everything
from kdlab.trust import code_names, trusted_among


class NonFiniteLossError(KdlabError):
    """Training produced a NaN or infinite loss."""


@dataclass
class RunResult:
    out_dir: Path
    summary: dict[str, Any]


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
        dataset: DataSource | None = None,
        teacher: nn.Module | None = None,
        callbacks: list[Callback] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.resume = resume
        log = log or (lambda msg: None)
        self.log = lambda msg: log(msg) if self.dist.is_main else None
        self.warn = lambda msg: warn(msg) if self.dist.is_main else None  # shown with --quiet too
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
        if self.method.views > 1 and hasattr(self.data, "prepare_views"):  # streamed: workers render both views
            self.data.prepare_views(self.method.views)
        # evaluated after every epoch; the first one chooses the best epoch (test unless data.read_test=false)
        self.eval_splits = [s for s, on in (("test", cfg.data.read_test), ("val", bool(cfg.data.val_split))) if on]
        self._build_models(teacher)
        self._setup_teacher_cache()
        example = self.data.example_batch(2)
        check_model_fits_data(self.student, example, self.data, f"model '{cfg.model.name}'")
        if self.teacher is not None and cfg.teacher is not None:
            check_model_fits_data(self.teacher, example, self.data, f"teacher '{cfg.teacher.name}'")
        labels = self.data.labels("train") if self.method.needs_train_labels else None
        self.method.bind_data(self.data.num_train, labels)
        self.method.setup(self.student, self.teacher, example)
        self.method.to(self.device)
        self._setup_fast_path(example)
        self.optimizer = build_optimizer(cfg.optim, self.student, self.method)
        self.callbacks = [CALLBACKS.get(name)() for name in cfg.instruments] + build_trackers(cfg.logging)
        self.callbacks += list(callbacks or [])
        for cb in self.callbacks:
            cb.setup(self)  # validation only: nothing on disk has been touched yet
        self.dist.barrier()  # every rank has validated before rank 0 touches the folder (in run())
        self.overwrite = overwrite

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
        if cfg.train.sync_bn:
            self.student = sync_batchnorm(self.student, self.dist)
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
        refusal = cache_refusal(cfg.method.name, self.method)  # stage features, or batch statistics
        if refusal:
            raise ConfigError(refusal)
        self.cache = TeacherCache(cfg.teacher.cache, self.device)
        self.cache.check(self.data, teacher_fingerprint(cfg.teacher), self.method.teacher_outputs)
        check_cache_inputs(self.cache.info.meta.get("data"), cfg.data, cfg.teacher.cache)
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
        if self.cfg.train.drop_last and self.data.num_train < self.cfg.train.batch_size:
            raise ConfigError(f"train.drop_last with {self.data.num_train} training samples, fewer than "
                              f"train.batch_size={self.cfg.train.batch_size}: every batch would be dropped")  # fmt: skip
        self.meter = StepMeter(self.device)
        self._teacher_fwd = None
        if self.teacher is not None:  # BatchNorm folded; under bf16/fp16 weights in that dtype
            assert self.cfg.teacher is not None
            self._teacher_fwd, note = self.fast.frozen_forward(self.teacher, example, self.cfg.teacher.fold_bn,
                                                               self.method.teacher_bn)  # fmt: skip
            self.log(f"teacher forward: {note}")
        student_fwd = self.fast.maybe_compile(self.student.forward_features)
        self.objective: nn.Module = Objective(self.student, self.method, student_fwd)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.objective = DDP(self.objective, device_ids=ids, find_unused_parameters=any(
                True for _ in self.method.parameters()))  # fmt: skip

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
        """Top-1 and top-5 accuracy (%) and cross-entropy of the method's test-time prediction on a split."""
        self.student.eval()

        def predict(x: torch.Tensor) -> torch.Tensor:  # the training fast path: memory format and autocast
            with self._autocast():
                return self.method.predict(features(self.student, self.fast.inputs(x)))

        return evaluate_split(predict, self.data, split, self.cfg.train.eval_batch_size)

    @torch.inference_mode()
    def _teacher_forward(self, x: torch.Tensor, eval_bn: bool = False) -> ModelOutput:
        assert self._teacher_fwd is not None and self.teacher is not None
        # the teacher's accuracy is its eval-mode one, also when training reads batch statistics (method.teacher_bn)
        fwd = self.teacher.forward_features if eval_bn and self.method.teacher_bn == "train" else self._teacher_fwd
        with self._autocast():
            return fwd(self.fast.inputs(x))

    def teacher_outputs(self, x: torch.Tensor, index: torch.Tensor, epoch: int) -> ModelOutput:
        """The teacher's outputs for a training batch: replayed from the cache, or a live forward."""
        if self.cache is not None:
            return self.cache.outputs(epoch, index)
        out = self._teacher_forward(x)
        return keep_fields(out, self.method.teacher_outputs)  # leave inference mode: clone what the method reads

    def forward_losses(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, epoch: int
    ) -> tuple[ModelOutput, dict[str, torch.Tensor], torch.Tensor]:
        """The forward half of a training step on one batch: teacher outputs (live or cached, and the strong view of
        two-view methods), the student under the run's autocast, the named loss terms and their sum."""
        x = self.fast.inputs(x)
        uses_teacher = self.teacher is not None and self.method.teacher_outputs
        t_out = self.teacher_outputs(x, idx, epoch) if uses_teacher else None
        views: tuple = ()
        if self.method.views == 2:  # a strong view of the same samples (MLKD)
            xs = self.fast.inputs(self.data.strong_batch(idx, self.augment_seed, epoch))
            views = (xs, self.teacher_outputs(xs, idx, epoch) if uses_teacher else None)
        with self._autocast():
            s_out, terms = self.objective(x, t_out, y, epoch, *views, index=idx)
            loss = sum(terms.values())
        assert isinstance(loss, torch.Tensor)
        return s_out, terms, loss

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg = self.cfg
        lr = self.method.pre_lr(cfg.optim.lr) if epoch <= 0 else lr_at(epoch, cfg.optim.lr, cfg.train.epochs, cfg.schedule)
        set_epoch_hyperparameters(self.optimizer, cfg.optim, lr, self.method.pre_optim if epoch <= 0 else None)
        # dropout etc.: a function of (seed, epoch, rank) too
        torch.manual_seed(derive_seed(cfg.seed, "epoch", epoch, *([self.dist.rank] if self.dist.enabled else [])))
        self.objective.train()
        if epoch <= 0 and not self.method.pre_trains_student:  # a pre-phase that initialises only the method's parts
            self.student.eval()  # (FT's paraphraser): the student's BatchNorm statistics stay, as in RepDistiller
        dev = self.device
        meter = self.meter
        meter.reset()
        n, bsz, world = self.data.num_train, cfg.train.batch_size, self.dist.world
        total = n // bsz if cfg.train.drop_last else num_batches(n, bsz)  # drop_last: one static batch shape
        if world > 1 and 0 < n % bsz < world:
            total -= 1  # a last global batch smaller than the number of ranks is dropped (some ranks would be empty)
        it = self.data.train_batches(
            bsz, seed=cfg.seed, epoch=epoch,
            shard=(lambda idx: shard(idx, self.dist)) if self.dist.enabled else None, augment_seed=self.augment_seed,
            augment_epoch=self.cache.augment_epoch(epoch) if self.cache is not None else epoch,
        )  # fmt: skip
        bar = tqdm(
            it, total=total, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False,
            disable=not (cfg.train.progress and self.dist.is_main), dynamic_ncols=True,
        )  # fmt: skip
        for step, (x, y, idx) in enumerate(bar):
            if step >= total:
                break
            global_n = min(bsz, n - step * bsz)
            s_out, terms, loss = self.forward_losses(x, y, idx, epoch)
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
            meter.update(terms, loss, s_out.logits, y)  # in place, one preallocated buffer: no per-term tensors
            show_running_losses(bar, step, meter.sums, meter.seen)  # a host sync every REFRESH_EVERY steps
            if dev.type == "cpu" or step % 50 == 49:  # free on CPU; on GPUs a sync only every 50 steps
                if meter.first_bad_step() >= 0:
                    self._raise_non_finite(terms, epoch, meter.first_bad_step())
        if meter.first_bad_step() >= 0:
            self._raise_non_finite(terms, epoch, meter.first_bad_step())
        out = meter.means(self.dist.all_reduce_sum(meter.packed()))
        out["lr"] = lr
        return out

    def _raise_non_finite(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        bad = next((k for k, v in terms.items() if not torch.isfinite(v).all()), "loss")
        saved = ck.list_checkpoints(self.out / "checkpoints")
        kept = f"the last good checkpoint is kept in {saved[0]}" if saved else "no checkpoint had been written yet"
        raise NonFiniteLossError(f"non-finite loss (term '{bad}') at epoch {epoch}, step {step}; stopped, {kept}")

    # ----------------------------------------------------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run (or resume), holding the run folder's lock throughout: one writer per folder (engine/rundir.py)."""
        lock = open_run_folder(self.out, resume=self.resume, overwrite=self.overwrite) if self.dist.is_main else None
        ok = False
        try:
            self.dist.barrier()
            result = self._run()
            ok = True
            return result
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (kdlab.signals): keep all that was written for `--resume`
            if lock is not None:
                lock.release(failed=True)  # removes the folder only if it made it and wrote nothing into it yet
                lock = None
            raise
        finally:
            if lock is not None:
                if not ok and not self.resume and not ck.list_checkpoints(self.out / "checkpoints"):
                    clear_run(self.out)  # a start that failed (disk full, ...) leaves no half run blocking a retry
                lock.release(failed=not ok)

    def _run(self) -> RunResult:
        cfg, main = self.cfg, self.dist.is_main
        ckpt_dir = self.out / "checkpoints"
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.resume:  # first: from here on a signal leaves a folder that `--resume` starts at epoch 1
                save_config(cfg, self.out / "config.yaml")
        metrics = MetricsLog(self.out)
        start, sel = 0, self.eval_splits[0]  # the split choosing the best epoch (best.safetensors)
        record = RunRecord(sel)
        teacher_sha = teacher_fingerprint(cfg.teacher) if cfg.teacher is not None and self.teacher is not None else None
        state = load_resume_state(self.out, teacher_sha, self.log, self.warn) if self.resume else None
        self.dist.barrier()  # every rank has read and verified the folder before rank 0 rewrites config.yaml below
        if main and self.resume:  # verified first: a refused resume changes nothing
            extend_epochs(self.out, cfg.train.epochs, self.log)
        if state is not None:
            self._restore(state)
            start, record = state.meta["epoch"], RunRecord.restore(sel, state.meta)
            self.log(f"resuming {self.out} after epoch {start}")
        else:
            if main:
                save_config(cfg, self.out / "config.yaml")
            if self.teacher is not None:
                record.teacher_acc, record.teacher_top5 = self._teacher_accuracy()
                self.log(f"teacher {cfg.teacher.name} {sel} accuracy {record.teacher_acc:.2f}% "  # type: ignore[union-attr]
                         f"(top-5 {record.teacher_top5:.2f}%)")
        pre = self.method.pre_epochs  # a method's pre-phase runs first, as epochs 1 − pre … 0 (checkpoints count on)
        start -= pre
        if main:
            metrics.restore(start)
        integrity = integrity_record(self.out, teacher_sha) if main else {}
        trusted = trusted_among(code_names(cfg))  # every code key allowed only by --trust-code (kdlab.trust)
        if trusted:
            integrity["trusted_code"] = trusted
            self.log(f"calling code trusted with --trust-code: {', '.join(trusted)}")
        for cb in self.callbacks:
            cb.on_train_start(self)
        for epoch in range(start + 1, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch} if epoch > 0 else {"epoch": epoch, "phase": "pre"}
            row.update(self.train_epoch(epoch))
            if epoch == 0 and pre:
                self.optimizer.state.clear()  # the main phase starts with a fresh optimizer state (RepDistiller)
            t_train = time.perf_counter() - t0
            evs = {split: self.evaluate(split) for split in self.eval_splits}
            for split, e in evs.items():
                row.update({f"{split}_acc": e["acc"], f"{split}_top5": e["top5"], f"{split}_loss": e["loss"]})
            for cb in self.callbacks:
                row.update(cb.on_epoch_end(self, epoch))
            dt = time.perf_counter() - t0
            row.update(epoch_time_s=round(dt, 3), images_per_s=round(self.data.num_train / t_train, 1))
            improved = record.observe(epoch, evs, dt, t_train, self.data.num_train)
            if main:
                if improved:
                    ck.save_weights(self.out / "best.safetensors", self.student.state_dict())
                metrics.append(row)
                for cb in self.callbacks:
                    cb.on_epoch_row(self, row)
                meta = record.meta(world_size=self.dist.world, **integrity)
                ck.save_train_state(ckpt_dir, epoch + pre, self._state(epoch + pre, meta), keep=cfg.train.keep_checkpoints)
            self.dist.barrier()
            for cb in self.callbacks:
                cb.on_checkpoint(self, epoch)
            self.log(epoch_line(row, cfg.train.epochs))
        for cb in self.callbacks:
            cb.on_train_end(self)
        finals = {split: self.evaluate(split) for split in self.eval_splits}
        summary = record.summary(
            cfg, finals, num_params=num_params(self.student), device=str(self.device), world_size=self.dist.world,
            environment=environment.record(),  # packages, CPU and ISA, threads, torch build (kdlab.environment)
        )  # fmt: skip
        if "val" in finals:
            summary["val_split"] = getattr(self.data, "record", None)  # sizes, seed, digest (data/holdout.py)
        if trusted:
            summary["trusted_code"] = trusted
        skipped = self._skipped_images()
        if skipped is not None:
            summary["skipped_images"] = skipped
        if self.data.noisy_indices is not None:
            summary["label_noise"] = {"fraction": cfg.data.label_noise, "seed": cfg.data.label_noise_seed,
                                      "flipped": len(self.data.noisy_indices)}  # fmt: skip
        if main:
            ck.save_weights(self.out / "model.safetensors", self.student.state_dict())
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1))
        self.dist.barrier()
        return RunResult(self.out, summary)

    def _skipped_images(self) -> dict[str, int] | None:
        """Unreadable samples a streamed dataset skipped (``data.skip_bad_images``) per split, counted once each over
        every rank (a collective under torchrun); ``None`` for data that cannot skip. Counts what this process has
        seen: after ``--resume``, from the resumed epochs on (every epoch reads every sample once)."""
        seen = getattr(self.data, "skipped", None)
        if seen is None:
            return None
        out = {}
        for split in ("train", *self.eval_splits):
            mask = torch.zeros(self.data.split_size(split), device=self.device)
            rows = [i for s, i in seen if s == split]
            if rows:
                mask[torch.tensor(rows, device=self.device)] = 1
            out[split] = int((self.dist.all_reduce_sum(mask) > 0).sum().item())
        return out

    def _teacher_accuracy(self) -> tuple[float, float]:
        """The teacher's top-1 and top-5 accuracy (%) on the split choosing the best epoch (test, or val)."""
        ev = evaluate_split(
            lambda x: self._teacher_forward(x, eval_bn=True).logits, self.data, self.eval_splits[0],
            self.cfg.train.eval_batch_size,
        )
        return ev["acc"], ev["top5"]


def run(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False, **kwargs: Any
) -> RunResult:
    """Train (or distill, when the method needs a teacher) as described by ``cfg``; returns the run summary."""
    return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, **kwargs).run()
