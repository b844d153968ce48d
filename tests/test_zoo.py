"""The CIFAR zoo against the published state dicts (shared/specs/cifar_zoo_state_dicts.json).

Big models (ResNet50, wrn_40_6, vgg19) are only built and run on one 32×32 image.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdlab.models import MODELS, build, num_params

SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "cifar_zoo_state_dicts.json"
ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
    "wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_28_2", "wrn_28_4", "wrn_40_1", "wrn_40_2", "wrn_40_6",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50",
]  # fmt: skip
# numbers quoted in the issue (independent of the spec file)
ISSUE_COUNTS = {"wrn_40_2": 2_255_156, "vgg13": 9_462_180, "MobileNetV2": 812_836, "ShuffleV2": 1_355_528,
                "ResNet50": 23_705_252}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The big models run on one thread (shared CI cores: oversubscription is far slower than one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def spec() -> dict:
    if not SPEC.is_file():
        pytest.skip("shared/specs not present")
    return json.loads(SPEC.read_text())["models"]


@pytest.fixture(scope="module")
def models() -> dict:
    torch.manual_seed(0)
    return {name: build(name, num_classes=100).eval() for name in ZOO}


def test_zoo_is_complete(spec):
    assert sorted(spec) == sorted(ZOO)
    assert all(name in MODELS for name in ZOO)


@pytest.mark.parametrize("name, count", ISSUE_COUNTS.items())
def test_issue_parameter_counts(models, name, count):
    assert num_params(models[name]) == count


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count_and_state_dict_follow_spec(spec, models, name):
    model, s = models[name], spec[name]
    assert num_params(model) == s["num_params"]
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(k, list(shape)) for k, shape in s["state_dict"]]
    buffers = sum(v.numel() for k, v in sd.items() if "running_" in k or k.endswith("num_batches_tracked"))
    assert buffers == s["num_buffer_elems"]


@pytest.mark.parametrize("name", ZOO)
def test_spec_state_dict_loads_strictly(spec, name):
    """A checkpoint made only from the spec's names and shapes loads with strict=True (and is really used)."""
    state = {
        k: torch.zeros(shape, dtype=torch.long) if k.endswith("num_batches_tracked") else torch.full(shape, 0.5)
        for k, shape in spec[name]["state_dict"]
    }
    model = build(name, num_classes=100)
    model.load_state_dict(state, strict=True)
    prefix = spec[name]["classifier"]["state_dict_prefix"]
    assert torch.equal(model.classifier.weight, state[f"{prefix}.weight"])


@pytest.mark.parametrize("name", ZOO)
def test_feature_interface_follows_spec(spec, models, name):
    model, s = models[name], spec[name]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_features(x)
        logits = model(x)
    assert list(out.prepool.shape) == s["prepool_feature"]["shape_for_1x3x32x32"]
    assert out.pooled.shape == (1, s["pooled_feature"]["dim"])
    assert torch.allclose(out.pooled, out.prepool.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(out.logits, model.classifier(out.pooled), atol=1e-6)
    assert torch.equal(logits, out.logits)
    cls = s["classifier"]
    assert model.classifier is model.get_submodule(cls["state_dict_prefix"])
    assert (model.classifier.in_features, model.classifier.out_features) == (cls["in_features"], cls["out_features"])


def test_num_classes_and_bad_kwargs():
    from kdlab.errors import ConfigError

    assert build("wrn_16_1", num_classes=10).classifier.out_features == 10
    assert build("MobileNetV2", num_classes=7)(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(ConfigError, match="model.kwargs do not fit 'vgg8'"):
        build("vgg8", num_classes=10, depth=3)


def test_mobilenet_does_not_print(capsys):
    build("MobileNetV2", num_classes=100)
    assert capsys.readouterr().out == ""
