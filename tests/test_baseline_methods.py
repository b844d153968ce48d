"""The baseline methods of issue 12 (rkd, pkt, vid, crd, wsld, catkd) through the CLI on synthetic CIFAR-shaped data
(resnet20 → resnet8): one epoch distils; a run killed with SIGKILL mid-epoch resumes to bit-identical weights."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_yaml

METHODS = ["rkd", "pkt", "vid", "crd", "wsld", "catkd"]
PARAMS = {"crd": {"nce_k": 64}}  # a 64-image training set: 16384 noise samples per positive only cost time


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    folder = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    ck.save_weights(folder / "resnet20.safetensors", build("resnet20", num_classes=10).state_dict())
    return write_yaml(folder / "recipe.yaml", {
        "seed": 1,
        "data": {"name": "synthetic", "num_samples": 80, "num_classes": 10, "train_split": 0.8},
        "model": {"name": "resnet8"},
        "teacher": {"name": "resnet20", "checkpoint": str(folder / "resnet20.safetensors")},
        "optim": {"lr": 0.01},
        "schedule": {"name": "constant"},
        "train": {"epochs": 2, "batch_size": 16, "threads": 1, "device": "cpu", "progress": False},
    })  # fmt: skip


def _args(recipe: Path, method: str, out: Path) -> list[str]:
    extra = [f"method.{k}={v}" for k, v in PARAMS.get(method, {}).items()]
    return ["distill", str(recipe), f"method.name={method}", *extra, "--quiet", "--out", str(out)]


def _child(args: list[str]) -> None:  # runs in a forked process (modules already imported: no start-up cost)
    import threading

    from tqdm import tqdm

    from kdlab.cli import main

    # tqdm's write lock is a process-shared semaphore inherited through the fork: a child SIGKILLed while holding it
    # would leave the parent's next progress bar waiting forever. The child takes a lock of its own.
    tqdm.set_lock(threading.RLock())
    os._exit(main(args))


@pytest.mark.parametrize("method", METHODS)
def test_method_distils_and_resumes_bit_identically_after_sigkill(method, recipe, tmp_path, one_thread):
    from kdlab.cli import main
    from kdlab.engine import checkpoint as ck

    ref = tmp_path / "ref"
    assert main(_args(recipe, method, ref)) == 0
    rows = (ref / "metrics.jsonl").read_text().splitlines()
    term = {"catkd": "cat"}.get(method, method)
    assert len(rows) == 2 and all(f'"train_{term}"' in r and '"train_ce"' in r for r in rows)

    out = tmp_path / "killed"
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(_args(recipe, method, out),))
    proc.start()
    deadline = time.time() + 120
    while proc.is_alive() and time.time() < deadline and not ck.list_checkpoints(out / "checkpoints"):
        time.sleep(0.01)
    killed = proc.is_alive()
    if killed:  # epoch 1 is saved: kill in the middle of epoch 2
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert main(["distill", "--resume", "--out", str(out), "--quiet"]) == 0
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "crd":  # the memory bank is method state, restored with the checkpoint
        sa, sb = ck.load_latest(ref / "checkpoints"), ck.load_latest(out / "checkpoints")
        mem = [k for k in sa.tensors if "memory" in k]
        assert len(mem) == 2 and all(torch.equal(sa.tensors[k], sb.tensors[k]) for k in mem + ["method.z"])
    print(f"{method}: killed mid-run {killed}")


def test_crd_noise_indices_come_from_other_classes_and_memory_update_is_the_release_momentum():
    from kdlab.methods import build_method
    from kdlab.models import build

    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 1, 1])
    m = build_method("crd", {"nce_k": 500})
    m.bind_data(len(labels), labels)
    index = torch.arange(10)
    neg = m.negatives(index)
    assert neg.shape == (10, 500) and bool((labels[neg] != labels[:, None]).all())
    assert set(neg[0].tolist()) == {i for i in range(10) if labels[i] != 2}  # every other-class sample is drawn
    student, teacher = build("mnist1d_mlp", num_classes=3), build("mnist1d_cnn", num_classes=3).eval()
    x = torch.randn(4, 40)
    m.setup(student, teacher, x[:2])
    before = m.memory_student.clone()
    s_out, t_out = student.forward_features(x), teacher.forward_features(x)
    m.losses(s_out, t_out, labels[[3, 1, 7, 5]], 1, index=torch.tensor([3, 1, 7, 5]))["crd"].backward()
    e = m.embed_student(s_out.pooled).detach()
    expected = torch.nn.functional.normalize(before[[3, 1, 7, 5]] * 0.5 + e * 0.5, dim=1)
    assert torch.allclose(m.memory_student[[3, 1, 7, 5]], expected, atol=1e-6)
    untouched = [0, 2, 4, 6, 8, 9]
    assert torch.equal(m.memory_student[untouched], before[untouched])
    assert float(m.z[0]) > 0 and float(m.z[1]) > 0


def test_feature_methods_reject_token_shaped_features():
    from kdlab.errors import ConfigError
    from kdlab.methods import build_method
    from kdlab.models.base import ModelOutput

    class Tokens(torch.nn.Module):  # a transformer-like model: N×T×C tokens, pooled over T
        classifier = torch.nn.Linear(8, 3)

        def forward_features(self, x):
            tokens = x.reshape(len(x), 5, 8)
            pooled = tokens.mean(dim=1)
            return ModelOutput(self.classifier(pooled), tokens, pooled)

    for name in ("fitnet", "vid", "catkd"):
        with pytest.raises(ConfigError, match=r"token-shaped \(2, 5, 8\) \(N×T×C\)"):
            build_method(name, {}).setup(Tokens(), Tokens(), torch.randn(2, 40))


@pytest.mark.slow
def test_crd_under_torchrun_keeps_one_global_memory(tmp_path):
    """2 processes (gloo), local batches of 5 and 3: both ranks end with the same memory, equal to the single-process
    update with the global batches, and Z from the global first batch."""
    import subprocess
    import sys

    from test_distributed import _free_port

    worker = Path(__file__).with_name("_crd_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(worker), str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("memory_student", "memory_teacher", "z"):
        assert torch.equal(r0[key], r1[key]), key
    mem_s, mem_t = (t.clone() for t in r0["initial"])
    for idx, e_s, e_t in r0["steps"]:
        assert idx.tolist() == sorted(idx.tolist()) and len(idx) == 8  # both ranks' samples, in rank order
        mem_s[idx] = torch.nn.functional.normalize(mem_s[idx] * 0.5 + e_s * 0.5, dim=1)
        mem_t[idx] = torch.nn.functional.normalize(mem_t[idx] * 0.5 + e_t * 0.5, dim=1)
    assert torch.allclose(r0["memory_student"], mem_s, atol=1e-6)
    assert torch.allclose(r0["memory_teacher"], mem_t, atol=1e-6)


def test_vid_has_one_term_per_intermediate_stage_pair_as_released():
    """RepDistiller applies VID to feat[1:-1] (every stage output); ``layers=last`` keeps only the pre-pool maps."""
    from kdlab.methods import build_method
    from kdlab.models import build
    from kdlab.models.base import ModelOutput

    torch.manual_seed(0)
    student, teacher = build("resnet8", num_classes=10), build("resnet20", num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    m = build_method("vid", {})
    m.setup(student, teacher, x[:2])
    assert m.teacher_outputs == ("stages",) and len(m.regressors) == len(m.log_scales) == 3
    s_out, t_out = student.forward_features(x), teacher.forward_features(x)
    full = m.losses(s_out, t_out, y, 1)["vid"]
    from kdlab import losses as L

    by_hand = sum(L.vid(reg(fs), ft.detach(), L.vid_variance(a, 1e-5))  # equal stage sizes: no pooling
                  for fs, ft, reg, a in zip(s_out.stages, t_out.stages, m.regressors, m.log_scales))
    assert torch.allclose(full, by_hand)
    last = build_method("vid", {"layers": "last"})
    last.setup(student, teacher, x[:2])
    assert last.teacher_outputs == ("prepool",) and len(last.regressors) == 1
    assert isinstance(t_out, ModelOutput)
