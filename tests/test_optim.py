"""Optimizers (engine/optim.py): SGD / Adam / AdamW and the weight-decay exemptions for normalisation layers and
biases; Adam state survives a resume exactly."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from kdlab.config import OptimConfig, load_config
from kdlab.engine import Trainer, run
from kdlab.engine import checkpoint as ck
from kdlab.engine.optim import build_optimizer
from kdlab.errors import ConfigError
from kdlab.models import build

from conftest import CONFIGS, SMALL


def _names(model, opt):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [sorted(by_id[id(p)] for p in g["params"]) for g in opt.param_groups]


@pytest.mark.parametrize(
    "name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)]
)
def test_optimizer_kinds_and_their_settings(name, cls):
    model = build("resnet8", num_classes=10)
    opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=1e-3, betas=(0.8, 0.9)), model)
    assert type(opt) is cls and len(opt.param_groups) == 1
    assert opt.param_groups[0]["params"] == list(model.parameters())  # one group, module order (checkpoint layout)
    assert opt.param_groups[0]["weight_decay"] == 1e-3
    if name != "sgd":
        assert opt.param_groups[0]["betas"] == (0.8, 0.9)


def test_no_decay_groups_for_norm_layers_and_biases():
    model = build("resnet8", num_classes=10)
    norm_only = _names(model, build_optimizer(OptimConfig(no_decay_norm=True), model))
    assert all(".bn" in n or n.startswith("bn") or "downsample.1" in n for n in norm_only[1])
    assert "fc.bias" in norm_only[0] and not any("bn" in n for n in norm_only[0])
    both = build_optimizer(OptimConfig(no_decay_norm=True, no_decay_bias=True), model)
    assert "fc.bias" in _names(model, both)[1] and "fc.weight" in _names(model, both)[0]
    assert both.param_groups[1]["weight_decay"] == 0.0 and both.param_groups[0]["weight_decay"] == 5e-4
    bias_only = _names(model, build_optimizer(OptimConfig(no_decay_bias=True), model))
    assert all(n.endswith(".bias") for n in bias_only[1]) and "bn1.weight" in bias_only[0]


def test_bad_optimizer_settings_are_one_line_errors():
    base = CONFIGS / "mnist1d" / "student_ce.yaml"
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(base, ["optim.name=lamb"])
    with pytest.raises(ConfigError, match="optim.betas: betas must lie in"):
        load_config(base, ["optim.name=adam", "optim.betas=[0.9, 1.5]"])


def test_adamw_with_exemptions_resumes_exactly(tmp_path, one_thread):
    extra = ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.05", "optim.no_decay_norm=true",
             "optim.no_decay_bias=true", "train.epochs=2", "train.keep_checkpoints=2"]  # fmt: skip
    cfg = load_config(CONFIGS / "mnist1d" / "teacher_cnn.yaml", SMALL + extra)
    run(cfg, tmp_path / "full")
    run(cfg, tmp_path / "part")
    shutil.rmtree(ck.list_checkpoints(tmp_path / "part" / "checkpoints")[0])  # back to the end of epoch 1
    (tmp_path / "part" / "model.safetensors").unlink()
    Trainer(cfg, tmp_path / "part", resume=True).run()
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
