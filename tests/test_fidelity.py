"""Fidelity gaps of issue 12: any WRN-D-W, MLKD's separate level weights, SRRL's SimKD-repository variant, the
recipe fixes."""

from __future__ import annotations

import pytest
import torch

from kdlab import losses as L
from kdlab.config import load_config, read_recipe
from kdlab.errors import ConfigError
from kdlab.models import MODELS, build

from conftest import CONFIGS


@pytest.mark.parametrize("name, depth, width", [("wrn_40_4", 40, 4), ("wrn_10_1", 10, 1), ("wrn_22_3", 22, 3)])
def test_any_wrn_depth_and_width(name, depth, width):
    model = build(name, num_classes=7)
    assert name in MODELS and len(model.block1.layer) == (depth - 4) // 6 and model.fc.in_features == 64 * width
    if depth * width <= 22 * 8:  # (the largest forward costs seconds on a CPU)
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


@pytest.mark.parametrize("name", ["wrn_41_2", "wrn_4_1", "wrn_16_0"])
def test_impossible_wrn_is_a_one_line_error(name):
    assert name not in MODELS
    with pytest.raises(ConfigError, match=r"depth 6n\+4"):
        build(name)


def test_mlkd_level_weights_default_to_the_kd_weight_and_can_be_separate():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.arange(16) % 10
    same = L.mlkd_terms(s, t, y, kd_weight=9.0)
    split = L.mlkd_terms(s, t, y, kd_weight=9.0, batch_weight=9.0, class_weight=0.09)
    assert torch.equal(same["kd"], split["kd"]) and torch.equal(same["bc"], split["bc"])
    assert torch.allclose(split["cc"], same["cc"] / 100)
    none = L.mlkd_terms(s, t, y, kd_weight=9.0, batch_weight=0.0)
    assert float(none["bc"]) == 0.0
    cfg = load_config(CONFIGS / "mnist1d" / "student_mlkd_zscore_k10.yaml")
    assert (cfg.method.kd_weight, cfg.method.batch_weight, cfg.method.class_weight) == (9.0, 9.0, 0.09)
    assert cfg.method.standardize == "zscore"


def test_srrl_simkd_repo_variant_connects_the_pooled_vector_and_adds_kd():
    from kdlab.methods import build_method

    torch.manual_seed(0)
    s, t = build("resnet8", num_classes=10), build("resnet20", num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    paper, repo = build_method("srrl", {}), build_method("srrl", {"variant": "simkd_repo"})
    for m in (paper, repo):
        m.setup(s, t, x[:2])
    assert paper.teacher_outputs == ("logits", "prepool") and repo.teacher_outputs == ("logits", "pooled")
    assert isinstance(repo.connector.blocks[0][0], torch.nn.Linear)
    so, to = s.forward_features(x), t.forward_features(x)
    terms = repo.losses(so, to, y, 1)
    assert set(terms) == {"feature", "logit", "kd", "ce"}
    assert set(paper.losses(so, to, y, 1)) == {"feature", "logit", "ce"}
    trans = repo.connector(so.pooled)
    assert torch.allclose(terms["feature"], torch.nn.functional.mse_loss(trans, to.pooled))
    assert torch.allclose(terms["kd"], L.kd(so.logits, to.logits, 4.0))


def test_recipe_fixes():
    cifar = CONFIGS / "cifar100"
    assert read_recipe(cifar / "ijckd_resnet32x4_resnet8x4.yaml")["optim"]["nesterov"] is True
    simkd = read_recipe(cifar / "simkd_resnet32x4_resnet8x4.yaml")
    assert simkd["method"]["connector"] == "bottleneck" and "logit-standardization" in simkd["meta"]["paper"]
    assert simkd["meta"]["paper_top1"] == 78.08
    assert read_recipe(cifar / "kl_mse" / "_base.yaml")["optim"]["no_decay_norm"] is True
