import pytest

from kdlab.config import apply_overrides, load_config, parse_override, validate
from kdlab.errors import ConfigError

from conftest import CONFIGS, write_yaml


def test_override_values_are_parsed_as_yaml():
    assert parse_override("train.epochs=3") == (["train", "epochs"], 3)
    assert parse_override("schedule.milestones=[2,4]") == (["schedule", "milestones"], [2, 4])
    assert parse_override("teacher.checkpoint=none") == (["teacher", "checkpoint"], None)
    assert parse_override("data.root=/a=b") == (["data", "root"], "/a=b")


def test_overrides_apply_and_validate():
    cfg = load_config(CONFIGS / "mnist1d" / "student_kd.yaml", ["method.temperature=2", "train.epochs=7"])
    assert cfg.method.temperature == 2.0 and cfg.train.epochs == 7
    assert cfg.model.name == "mnist1d_mlp" and cfg.optim.nesterov  # from base.yaml


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
        ("method.temprature=3", "unknown key 'method.temprature' (did you mean 'method.temperature'?)"),
        ("model.name=resnet9", "unknown model 'resnet9' (did you mean 'resnet8'?)"),
        ("method.name=kdd", "unknown method 'kdd' (did you mean 'kd'?)"),
        ("method.temperature=-1", "method.temperature: Input should be greater than 0"),
        ("train.epochs=abc", "train.epochs: Input should be a valid integer"),
        ("schedule.milestones=[5,2]", "milestones must be positive and increasing"),
        ("train.device=gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("instruments=[nope]", "unknown instrument 'nope'"),
        ("trainn.epochs=3", "unknown key 'trainn' (did you mean 'train'?)"),
    ],
)
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "mnist1d" / "student_kd.yaml", [override])
    text = str(err.value)
    assert message in text and "\n" not in text


def test_malformed_yaml_names_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"malformed YAML in .*bad.yaml at line \d+"):
        load_config(bad)


def test_missing_model_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'model'"):
        validate({})
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_base_chain_merges_and_detects_loops(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml", "train": {"epochs": 3}})
    write_yaml(tmp_path / "b.yaml", {"model": {"name": "resnet8"}, "train": {"epochs": 9, "batch_size": 7}})
    cfg = load_config(tmp_path / "a.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.model.name) == (3, 7, "resnet8")
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_env_expansion_with_default(monkeypatch):
    monkeypatch.delenv("KDLAB_DATA_ROOT", raising=False)
    cfg = load_config(CONFIGS / "cifar100" / "resnet8.yaml")
    assert cfg.data.root == "../shared/data/cifar100"
    monkeypatch.setenv("KDLAB_DATA_ROOT", "/data")
    assert load_config(CONFIGS / "cifar100" / "resnet8.yaml").data.root == "/data/cifar100"


def test_standard_cifar_recipe_values():
    cfg = load_config(CONFIGS / "cifar100" / "kd_resnet32x4_resnet8x4.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr) == (240, 64, 0.05)
    assert cfg.schedule.milestones == [150, 180, 210] and cfg.schedule.gamma == 0.1
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 5e-4)
    assert (cfg.method.temperature, cfg.method.ce_weight, cfg.method.kd_weight) == (4.0, 0.1, 0.9)


def test_apply_overrides_refuses_to_descend_into_a_value():
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
