"""``kdlab.Distiller`` (own training loops) and ``examples/own_loop.py``: same loss terms as ``kdlab distill``."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, write_yaml

pytestmark = pytest.mark.usefixtures("one_thread")
EXAMPLE = REPO / "examples" / "own_loop.py"


def _example():
    spec = importlib.util.spec_from_file_location("kdlab_example_own_loop", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["kd", "fitnet"])
def test_example_own_loop_runs(method: str, capsys: pytest.CaptureFixture) -> None:
    ex = _example()
    out = ex.main(["--method", method, "--teacher-epochs", "3", "--student-epochs", "2", "--num-samples", "600"])
    assert out["teacher_acc"] > 30 and out["student_acc"] > 30  # 10 classes: chance is 10 %
    assert {"ce"} < set(out) and ({"kd"} if method == "kd" else {"feature"}) < set(out)
    assert f"student ({method}) test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "params"),
    [("kd", {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}), ("dkd", {"warmup_epochs": 5})],
)
def test_first_batch_terms_equal_cli(method: str, params: dict, tmp_path: Path) -> None:
    """One full-batch epoch of `kdlab distill` logs the loss terms of its only (first) batch; the own loop with the
    same user models, initialisation, teacher weights and batch gives the same terms."""
    from kdlab import Distiller
    from kdlab.cli import main
    from kdlab.config import load_config
    from kdlab.data import build_dataset
    from safetensors.torch import load_file

    from kdlab.engine.checkpoint import save_weights
    from kdlab.models.taps import TappedModel
    from kdlab.seeding import derive_seed, seed_everything
    from kdlab.trust import trusting

    ex = _example()
    torch.manual_seed(123)
    teacher = ex.Teacher()
    save_weights(tmp_path / "teacher.safetensors", TappedModel(teacher, "head").state_dict())
    recipe = write_yaml(tmp_path / "own.yaml", {
        "base": str(REPO / "src/kdlab/configs/mnist1d/base.yaml"),
        "data": {"num_samples": 1000},
        "model": {"name": f"{EXAMPLE}:Student", **ex.STUDENT_TAPS},
        "teacher": {"name": f"{EXAMPLE}:Teacher", **ex.TEACHER_TAPS, "checkpoint": str(tmp_path / "teacher.safetensors")},
        "method": {"name": method, **params},
        "train": {"epochs": 1, "batch_size": 800, "progress": False, "threads": 1},
    })  # fmt: skip
    with trusting():  # the recipe names the example's .py file: imported only with --trust-code (kdlab.trust)
        assert main(["distill", str(recipe), "--out", str(tmp_path / "run"), "--quiet", "--trust-code"]) == 0
        data = build_dataset(load_config(recipe).data)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    seed_everything(derive_seed(0, "init"))  # the engine's student initialisation for seed 0
    student = ex.Student(num_classes=10)
    fresh = ex.Teacher()
    TappedModel(fresh, "head").load_state_dict(load_file(tmp_path / "teacher.safetensors"))
    distiller = Distiller(student, fresh, method, student_taps=ex.STUDENT_TAPS, teacher_taps=ex.TEACHER_TAPS, **params)
    step = distiller.train()(data.transform.eval_batch(data.train.x), data.train.y, epoch=1)
    assert set(row) >= {f"train_{k}" for k in step.terms}
    for k, v in step.terms.items():
        assert float(v.detach()) == pytest.approx(row[f"train_{k}"], rel=1e-5), k
    assert float(step.loss.detach()) == pytest.approx(row["train_loss"], rel=1e-5)


class _Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, width), nn.ReLU())
        self.out = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x))


def test_parameters_cover_connector_not_teacher() -> None:
    from kdlab import Distiller
    from kdlab.errors import ConfigError

    student, teacher, x = _Net(), _Net(32), torch.randn(6, 8)
    d = Distiller(student, teacher, "fitnet", student_taps={"classifier": "out", "features": "body"},
                  teacher_taps={"classifier": "out", "features": "body"}, hint_layer=None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"call distiller.setup\(first_batch_x\) before distiller.parameters"):
        d.parameters()
    d.setup(x)
    ids = {id(p) for p in d.parameters()}
    assert {id(p) for p in student.parameters()} < ids  # the student, plus the connector
    assert not ids & {id(p) for p in teacher.parameters()}
    assert not any(k.startswith("teacher") for k in d.state_dict())
    d.train()
    assert d.student.training and not d.teacher.training
    step = d(x, torch.randint(0, 4, (6,)))
    step.loss.backward()
    assert all(p.grad is not None for p in d.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert set(step.terms) == {"feature", "ce"} and step.logits.shape == (6, 4)
    numbers = step.numbers()
    assert list(numbers) == [*step.terms, "loss"] and all(isinstance(v, float) for v in numbers.values())
    assert numbers["loss"] == pytest.approx(numbers["feature"] + numbers["ce"], rel=1e-6)


def test_learnable_temperature_and_default_taps() -> None:
    from kdlab import Distiller

    d = Distiller(_Net(), _Net(32), "ctkd")  # classifier taps default to each model's last nn.Linear
    d.setup(torch.randn(4, 8))
    assert len(list(d.parameters())) > len(list(d.student.parameters()))  # CTKD's temperature module trains too
    assert d.eval().predict(torch.randn(3, 8)).shape == (3, 4)


def test_bad_distiller_arguments_are_one_line() -> None:
    from kdlab import Distiller
    from kdlab.errors import ConfigError, KdlabError

    with pytest.raises(ConfigError, match=r"Distiller\(method='kd'\): unknown key 'temprature'.*temperature"):
        Distiller(_Net(), _Net(), "kd", temprature=2)
    with pytest.raises(ConfigError, match="method 'kd' needs a teacher"):
        Distiller(_Net(), None, "kd")
    with pytest.raises(KdlabError, match="unknown method 'kdd'"):
        Distiller(_Net(), _Net(), "kdd")
    with pytest.raises(ConfigError, match="'fc' is not a module of _Net"):
        Distiller(_Net(), _Net(), "kd", student_taps={"classifier": "fc"})
