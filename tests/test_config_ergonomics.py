"""Config ergonomics: a `base:` child removes inherited keys with `unset:`; `kdlab keys` is grouped."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import CONFIGS, write_yaml


def test_unset_removes_inherited_keys(tmp_path: Path) -> None:
    from kdlab.config import load_config, read_recipe

    base = write_yaml(tmp_path / "base.yaml", {
        "model": {"name": "mnist1d_mlp"}, "method": {"name": "kd", "temperature": 2.0, "ce_weight": 0.5},
        "train": {"epochs": 3, "batch_size": 32}, "meta": {"paper_top1": 70.0, "tag": "x"},
    })  # fmt: skip
    child = write_yaml(tmp_path / "child.yaml", {
        "base": base.name, "unset": ["method", "train.batch_size", "meta.paper_top1"], "method": {"name": "mse"},
    })  # fmt: skip
    raw = read_recipe(child)
    assert raw["method"] == {"name": "mse"}  # the whole inherited section is gone, not merged into
    assert raw["train"] == {"epochs": 3} and raw["meta"] == {"tag": "x"}
    assert "unset" not in raw and "base" not in raw
    cfg = load_config(child)
    assert cfg.method.name == "mse" and cfg.train.batch_size == 64  # back to the schema default
    # without unset, the kd parameters would be merged into the mse section and refused
    write_yaml(child, {"base": base.name, "method": {"name": "mse"}})
    with pytest.raises(Exception, match="temperature"):
        load_config(child)


def test_unset_through_a_chain_of_bases(tmp_path: Path) -> None:
    from kdlab.config import read_recipe

    write_yaml(tmp_path / "a.yaml", {"train": {"epochs": 3, "amp": "bf16"}})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml", "train": {"batch_size": 8}})
    write_yaml(tmp_path / "c.yaml", {"base": "b.yaml", "unset": ["train.amp"]})
    assert read_recipe(tmp_path / "c.yaml")["train"] == {"epochs": 3, "batch_size": 8}


@pytest.mark.parametrize(
    ("child", "message"),
    [
        ({"base": "base.yaml", "unset": ["train.nope"]}, r"unset: 'train.nope' is not set by its base recipe"),
        ({"base": "base.yaml", "unset": "train.epochs"}, r"'unset' must be a list of dotted keys"),
        ({"unset": ["train.epochs"]}, r"'unset' removes keys inherited from a 'base' recipe"),
    ],
)
def test_bad_unset_is_one_line(tmp_path: Path, child: dict, message: str) -> None:
    from kdlab.cli import main

    write_yaml(tmp_path / "base.yaml", {"model": {"name": "mnist1d_mlp"}, "train": {"epochs": 1}})
    path = write_yaml(tmp_path / "child.yaml", child)
    from kdlab.config import read_recipe
    from kdlab.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        read_recipe(path)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--dry-run"]) == 2
    assert not (tmp_path / "run").exists()


def test_keys_grouped_by_section_and_method(capsys: pytest.CaptureFixture) -> None:
    from kdlab.cli import main
    from kdlab.methods import METHODS

    assert main(["keys"]) == 0
    out = capsys.readouterr().out
    headings = [line.split("]")[0][1:] for line in out.splitlines() if line.startswith("[")]
    assert headings[:2] == ["top level", "data"]
    for section in ("model", "teacher", "optim", "schedule", "train", "logging", "method"):
        assert section in headings
    assert [h for h in headings if h.startswith("method ")] == [f"method {m}" for m in METHODS]
    kd = out.split("[method kd]")[1].split("\n\n")[0]
    assert "method.temperature" in kd and "method.warmup_epochs" not in kd  # DKD's parameter is not under KD
    train = out.split("[train]")[1].split("\n\n")[0]
    assert all(line.strip().startswith("train.") for line in train.splitlines()[1:])

    assert main(["keys", "dkd"]) == 0
    only = capsys.readouterr().out
    assert only.startswith("[method dkd]") and "method.warmup_epochs" in only and "[method kd]" not in only
    assert main(["keys", "logging"]) == 0
    assert "logging.wandb.mode" in capsys.readouterr().out
    assert main(["keys", "tran"]) == 2
    assert "unknown key group 'tran' (did you mean 'train'?)" in capsys.readouterr().err


def test_shipped_recipes_still_read() -> None:
    from kdlab.config import load_config

    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml")
    assert cfg.method.name == "kd" and cfg.logging.tensorboard is False
