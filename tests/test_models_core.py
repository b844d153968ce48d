import json
from pathlib import Path

import pytest
import torch

from kdlab.models import MODELS, build, num_params
from kdlab.errors import ConfigError

SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "cifar_zoo_state_dicts.json"
RESNETS = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4"]
COUNTS = {"resnet8": 83892, "resnet20": 278324, "resnet32": 472756, "resnet56": 861620, "resnet110": 1736564,
          "resnet8x4": 1233540, "resnet32x4": 7433860}  # fmt: skip


@pytest.fixture(scope="module")
def spec():
    if not SPEC.is_file():
        pytest.skip("shared/specs not present")
    return json.loads(SPEC.read_text())["models"]


@pytest.mark.parametrize("name, count", COUNTS.items())
def test_parameter_counts(name, count):
    assert num_params(build(name, num_classes=100)) == count


@pytest.mark.parametrize("name", RESNETS)
def test_state_dict_names_and_shapes_follow_spec(spec, name):
    sd = build(name, num_classes=100).state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, s) for k, s in spec[name]["state_dict"]]
    assert spec[name]["num_params"] == num_params(build(name, num_classes=100))


@pytest.mark.parametrize("name", ["resnet8", "resnet32x4"])
def test_checkpoint_with_spec_names_loads_strictly(spec, name):
    state = {
        k: (torch.zeros(s, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.randn(s))
        for k, s in spec[name]["state_dict"]
    }
    model = build(name, num_classes=100)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.fc.weight, state["fc.weight"])


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4"])
def test_feature_interface(spec, name):
    model = build(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model.forward_features(x)
    pre = spec[name]["prepool_feature"]["shape_for_1x3x32x32"]
    assert list(out.prepool.shape) == [2] + pre[1:]
    assert torch.allclose(out.pooled, out.prepool.mean(dim=(2, 3)))
    assert torch.allclose(out.logits, model.classifier(out.pooled))
    assert torch.allclose(model(x), out.logits)
    assert model.classifier is model.get_submodule(spec[name]["classifier"]["state_dict_prefix"])


def test_mnist1d_models_and_interface():
    cnn, mlp = build("mnist1d_cnn", num_classes=10), build("mnist1d_mlp", num_classes=10)
    assert (num_params(cnn), num_params(mlp)) == (32618, 15210)  # documented in kdlab.models.mnist1d
    x = torch.randn(5, 40)
    c, m = cnn.forward_features(x), mlp.forward_features(x)
    assert c.prepool.shape == (5, 128, 10) and c.pooled.shape == (5, 128) and c.logits.shape == (5, 10)
    assert m.prepool.shape == (5, 100) and torch.allclose(m.logits, mlp.classifier(m.pooled))


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="unknown model 'resnet9' \\(did you mean 'resnet8'\\?\\)"):
        build("resnet9")
    assert "resnet32x4" in MODELS
