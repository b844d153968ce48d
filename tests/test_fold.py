"""BatchNorm folding of the frozen teacher (kdlab.models.fold): which pairs fold, same outputs, original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlab.config import load_config
from kdlab.engine import Trainer
from kdlab.engine import checkpoint as ck
from kdlab.models import ModelOutput, build
from kdlab.models.fold import fold_batchnorm, foldable_pairs
from kdlab.models.taps import TappedModel


def _random_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot pass by accident."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


CASES = [  # (model, input shape, pairs expected: None = every BatchNorm)
    ("resnet8", (3, 3, 32, 32), None),
    ("wrn_16_2", (3, 3, 32, 32), 7),  # pre-activation: only the BatchNorms that follow a convolution
    ("vgg8", (3, 3, 32, 32), None),  # shape-dependent branch in forward_features
    ("MobileNetV2", (3, 3, 32, 32), None),  # depthwise (grouped) convolutions
    ("ShuffleV2", (3, 3, 32, 32), None),
    ("mnist1d_cnn", (3, 1, 40), None),  # Conv1d + BatchNorm1d
    ("resnet18", (2, 3, 64, 64), None),
]


@pytest.mark.parametrize(("name", "shape", "expected"), CASES, ids=[c[0] for c in CASES])
def test_fold_gives_the_same_outputs_and_leaves_the_model_alone(name, shape, expected):
    torch.manual_seed(0)
    model = _random_stats(build(name, num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*shape)
    forward, folded, why = fold_batchnorm(model, x[:2])
    assert why == "" and folded == (expected if expected is not None else _bn_count(model))
    assert _bn_count(forward) == _bn_count(model) - folded
    assert not any(p.requires_grad for p in forward.parameters())
    with torch.no_grad():
        ref, got = model.forward_features(x), forward(x)
    for a, b in zip(ref, got):
        for t, u in zip(a, b) if isinstance(a, tuple) else [(a, b)]:
            assert torch.allclose(u, t, rtol=1e-4, atol=1e-4 * t.abs().max().item()), name
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    assert _bn_count(model) == len([m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])


class _TwoReaders(nn.Module):
    """conv1's output feeds bn1 and a skip sum; conv2 runs twice (shared); conv3 → bn3 is the only clean pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward_features(self, x: torch.Tensor) -> ModelOutput:
        a = self.conv1(x)
        h = torch.relu(self.bn1(a)) + a  # a has two readers
        h = self.bn2(self.conv2(self.conv2(h)))  # conv2 called twice
        h = torch.relu(self.bn3(self.conv3(h)))
        pooled = h.mean((2, 3))
        return ModelOutput(self.fc(pooled), h, pooled)


def test_only_provably_equivalent_pairs_fold():
    torch.manual_seed(0)
    model = _random_stats(_TwoReaders())
    x = torch.randn(2, 3, 8, 8)
    assert foldable_pairs(model, x) == [("conv3", "bn3")]
    forward, folded, _ = fold_batchnorm(model, x)
    assert folded == 1
    with torch.no_grad():
        assert torch.allclose(forward(x).logits, model.forward_features(x).logits, atol=1e-5)


def test_a_hook_reading_a_folded_convolution_keeps_the_model_unfolded():
    """A user model whose feature tap is a convolution that feeds a BatchNorm: folding would change the tapped
    feature, the check on the example batch sees it and the teacher runs as stored."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    torch.manual_seed(0)
    model = _random_stats(TappedModel(Net(), classifier="fc", features="conv"))
    forward, folded, why = fold_batchnorm(model, torch.randn(2, 3, 8, 8))
    assert folded == 0 and "other outputs" in why
    assert forward.model is model  # type: ignore[attr-defined]


def test_distillation_with_a_folded_teacher_matches_the_stored_teacher(tmp_path, one_thread):
    """Same KD terms on the first batch and the same teacher accuracy with and without teacher.fold_bn."""
    torch.manual_seed(0)
    path = tmp_path / "t.safetensors"
    ck.save_weights(path, _random_stats(build("resnet8", num_classes=10)).state_dict())
    base = {"data": {"name": "synthetic", "num_samples": 150, "train_split": 0.8, "num_classes": 10},
            "model": {"name": "resnet8"}, "teacher": {"name": "resnet8", "checkpoint": str(path)},
            "method": {"name": "kd"}, "schedule": {"name": "constant"},
            "train": {"epochs": 1, "batch_size": 32, "progress": False}}  # fmt: skip
    logs: dict[bool, list[str]] = {True: [], False: []}
    results = {}
    for fold in (True, False):
        cfg = load_config(None, [f"teacher.fold_bn={str(fold).lower()}"], base=base)
        tr = Trainer(cfg, tmp_path / f"r{fold}", log=logs[fold].append)
        x, y, idx = next(iter(tr.data.train_batches(32, seed=0, epoch=1, augment_seed=0)))
        _, terms, _ = tr.forward_losses(x, y, idx, 1)
        results[fold] = ({k: v.item() for k, v in terms.items()}, tr._teacher_accuracy())
    assert any("9 BatchNorm(s) folded" in line for line in logs[True])
    assert any("BatchNorm folding off" in line for line in logs[False])
    for k, v in results[False][0].items():
        assert results[True][0][k] == pytest.approx(v, rel=1e-5)
    assert results[True][1] == results[False][1]
