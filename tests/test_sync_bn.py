"""train.sync_bn: under torchrun a BatchNorm model trains exactly as one process on the global batch."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kdlab.engine.distributed import DistInfo, GlobalBatchNorm, sync_batchnorm

from conftest import CONFIGS
from test_distributed import _torchrun

ARGS = [str(CONFIGS / "mnist1d" / "student_ce.yaml"), "--quiet", "model.name=mnist1d_cnn", "data.num_samples=500",
        "train.batch_size=64", "train.threads=1", "seed=3", "schedule.name=constant", "train.epochs=2",
        "train.sync_bn=true"]  # fmt: skip


def test_conversion_keeps_parameters_and_keys():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Sequential(nn.BatchNorm1d(4, affine=False)))
    keys, weight = list(model.state_dict()), model[1].weight
    assert sync_batchnorm(model, DistInfo()) is model and type(model[1]) is nn.BatchNorm1d  # one process: unchanged
    converted = sync_batchnorm(model, DistInfo(rank=0, world=2))
    assert isinstance(converted[1], GlobalBatchNorm) and isinstance(converted[2][0], GlobalBatchNorm)
    assert converted[1].weight is weight and list(converted.state_dict()) == keys
    x = torch.randn(6, 1, 9)
    ref = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4))
    ref.load_state_dict({k: v for k, v in converted.state_dict().items() if not k.startswith("2.")})
    # without a process group it is plain BatchNorm: same output and running statistics
    assert torch.allclose(converted[:2](x), ref(x), atol=1e-6)
    assert torch.allclose(converted[1].running_var, ref[1].running_var)


@pytest.mark.slow
def test_two_processes_with_sync_bn_match_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    res = subprocess.run([sys.executable, "-m", "kdlab", "train", *ARGS, "--out", str(single)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    res = _torchrun("train", *ARGS, "--out", str(ddp))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count('"world_size"') == 1  # only rank 0 prints the summary
    a, b = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (single, ddp))
    for ra, rb in zip(a, b, strict=True):
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rb["test_acc"] == pytest.approx(ra["test_acc"], abs=0.51)
    wa, wb = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)  # running stats included
    assert diff < 1e-4, diff
