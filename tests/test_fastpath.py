"""The GPU-ready fast path, checked on CPU: no recompiles after the first epoch, bookkeeping without per-term
allocations, the bf16 copy of the frozen teacher, evaluation on the training fast path, static shapes."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdlab.config import TrainConfig, load_config
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.engine.fastpath import FastPath, resolve_amp, resolve_compile_mode
from kdlab.engine.meter import StepMeter
from kdlab.errors import ConfigError
from kdlab.models import build

from conftest import CONFIGS, SMALL


def test_recompile_count_is_zero_after_the_first_epoch(tmp_path, teacher_run, one_thread, monkeypatch):
    """DKD reads the Python-int epoch (its warm-up factor) and 800 % 48 leaves a partial last batch: neither may
    recompile once the first epoch (and an evaluation) has run. Recompiles are decided by dynamo's guards, whatever
    the backend: ``aot_eager`` (forward + backward traced, no code generation) keeps the test fast."""
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    modes: list[str] = []

    def cheap(fn, mode=None, dynamic=None, **kw):
        modes.append(mode)
        return compile_(fn, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", cheap)
    torch._dynamo.reset()
    cfg = load_config(CONFIGS / "mnist1d" / "student_dkd.yaml",
                      [f"teacher.checkpoint={teacher_run}", *SMALL, "train.batch_size=48", "train.compile=true"])  # fmt: skip
    tr = Trainer(cfg, tmp_path / "run")
    counters.clear()
    first = tr.train_epoch(1)
    tr.evaluate()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0 and first["train_loss"] == first["train_loss"]
    tr.train_epoch(2)
    tr.evaluate()
    assert counters["stats"]["unique_graphs"] == compiled, "recompiled in the second epoch"
    assert modes == ["default", "default"]  # teacher and student, inductor's default mode on CPU


class _Allocations(TorchDispatchMode):
    """Counts the operators that return fresh tensors (neither in place nor ``out=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fresh = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if not name.endswith("_") and "out" not in kwargs and func._schema.overload_name != "out":
            self.fresh += 1
        return func(*args, **kwargs)


def _fresh_per_step(num_terms: int) -> tuple[int, StepMeter]:
    meter = StepMeter(torch.device("cpu"))
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    terms = {f"t{i}": torch.rand(()) for i in range(num_terms)}
    loss = sum(terms.values())
    meter.update(terms, loss, logits, y)  # first step allocates the buffer
    ptr = meter.buf.data_ptr()
    with _Allocations() as count:
        for _ in range(3):
            meter.update(terms, loss, logits, y)
    assert meter.buf.data_ptr() == ptr
    return count.fresh, meter


def test_bookkeeping_adds_no_per_term_allocation_per_step():
    one, _ = _fresh_per_step(1)
    six, meter = _fresh_per_step(6)
    assert one == six, f"{one} fresh tensors per 3 steps with 1 term, {six} with 6"
    # and the sums are right: 4 identical steps of batch 8
    means = meter.means()
    assert means["train_t3"] == pytest.approx(float(meter.sums["t3"]) / 32)
    assert meter.seen == 32 and meter.first_bad_step() == -1


def test_meter_finds_the_first_non_finite_step():
    meter = StepMeter(torch.device("cpu"))
    logits, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    for v in (1.0, 2.0, float("nan"), 3.0, float("inf")):
        t = torch.tensor(v)
        meter.update({"ce": t}, t, logits, y)
    assert meter.first_bad_step() == 2


def test_bf16_teacher_copy_matches_autocast_within_bf16_tolerance():
    torch.manual_seed(0)
    teacher = build("resnet8", num_classes=10).eval().requires_grad_(False)
    x = torch.randn(16, 3, 32, 32)
    fast = FastPath(TrainConfig(amp="bf16"), torch.device("cpu"), x)
    for fold in (False, True):
        forward, note = fast.frozen_forward(teacher, x[:2], fold_bn=fold)
        assert "weights in bf16" in note
        assert all(p.dtype == torch.bfloat16 for p in forward.parameters())  # type: ignore[attr-defined]
        assert all(p.dtype == torch.float32 for p in teacher.parameters())  # the original stays float32
        with torch.inference_mode(), fast.autocast():
            ref, got = teacher(x).float(), forward(x).logits.float()
        assert torch.allclose(got, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    fp32, note = FastPath(TrainConfig(amp="none"), torch.device("cpu"), x).frozen_forward(teacher, x, fold_bn=False)
    assert fp32.model is teacher and note == "BatchNorm folding off"  # type: ignore[attr-defined]


def _cifar_cfg(tmp_path, *extra):
    path = tmp_path / "t.safetensors"
    if not path.exists():
        ck.save_weights(path, build("resnet8", num_classes=10).state_dict())
    base = {"data": {"name": "synthetic", "num_samples": 150, "train_split": 0.8, "num_classes": 10},
            "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": str(path)},
            "method": {"name": "kd"}, "schedule": {"name": "constant"},
            "train": {"epochs": 1, "batch_size": 32, "progress": False, "threads": 1}}  # fmt: skip
    return load_config(None, list(extra), base=base)


def test_training_and_evaluation_use_the_fast_path(tmp_path, one_thread):
    """bf16 autocast + channels_last on CPU: the student sees NHWC inputs under autocast in training and in
    evaluation; the teacher runs as a bf16 copy; drop_last gives only full batches."""
    tr = Trainer(_cifar_cfg(tmp_path, "train.amp=bf16", "train.channels_last=true", "train.drop_last=true"),
                 tmp_path / "r")  # fmt: skip
    assert {p.dtype for p in tr._teacher_fwd.parameters()} == {torch.bfloat16}  # type: ignore[union-attr]
    seen: list[tuple[bool, bool, int, bool]] = []
    inner = tr.student.forward_features

    def spy(x):
        seen.append((x.is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu"), len(x),
                     tr.student.training))  # fmt: skip
        return inner(x)

    tr.student.forward_features = spy  # evaluation calls it directly
    tr.objective._forward = spy  # training through the objective
    out = tr.train_epoch(1)
    ev = tr.evaluate()
    train_calls = [s for s in seen if s[3]]
    assert len(train_calls) == 120 // 32 and all(s[2] == 32 for s in train_calls)  # 3 full batches, 24 dropped
    assert all(s[0] and s[1] for s in seen) and any(not s[3] for s in seen)
    assert out["train_loss"] > 0 and 0 <= ev["acc"] <= 100


def test_defaults_and_bad_drop_last(tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TrainConfig().amp == "auto" and resolve_amp("auto", cpu) == "none" and resolve_amp("auto", cuda) == "bf16"
    assert resolve_amp("fp16", cuda) == "fp16"
    assert resolve_compile_mode("auto", cuda) == "reduce-overhead" and resolve_compile_mode("auto", cpu) == "default"
    with pytest.raises(ConfigError, match="drop_last"):
        Trainer(_cifar_cfg(tmp_path, "train.drop_last=true", "train.batch_size=200"), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_meter_keeps_sums_when_a_method_changes_its_terms_within_an_epoch():
    meter = StepMeter(torch.device("cpu"))
    logits, y = torch.randn(2, 3), torch.zeros(2, dtype=torch.long)
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    meter.update({"ce": one}, one, logits, y)
    meter.update({"ce": one, "kd": two}, one + two, logits, y)
    meter.update({"kd": two}, two, logits, y)
    means = meter.means()
    # per image over 6 images: ce (1+1)·2, kd (2+2)·2, loss (1+3+2)·2
    assert means["train_ce"] == pytest.approx(4 / 6) and means["train_kd"] == pytest.approx(8 / 6)
    assert means["train_loss"] == pytest.approx(2.0) and meter.seen == 6


def test_meter_of_an_epoch_without_steps_reports_zeros():
    meter = StepMeter(torch.device("cpu"))
    assert meter.packed().tolist() == [0.0, 0.0, 0.0] and meter.first_bad_step() == -1
    assert meter.means() == {"train_loss": 0.0, "train_acc": 0.0}
