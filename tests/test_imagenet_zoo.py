"""ImageNet zoo (torchvision names, exact sizes), torchvision .pth teachers read weights-only, and top-5 everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, SMALL
from kdlab.models import MODELS, build, num_params

# the numbers of torchvision's model cards / the issue, at 1000 classes
COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808, "mobilenet_v1": 4_231_976,
}  # fmt: skip
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(blocks: tuple[int, ...], bottleneck: bool) -> list[str]:
    """torchvision's ResNet state-dict keys, in order, from its naming rules (not from kdlab's code)."""
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in BN]
    convs = 3 if bottleneck else 2
    for layer, n in enumerate(blocks, start=1):
        for i in range(n):
            p = f"layer{layer}.{i}"
            for c in range(1, convs + 1):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in BN]
            if i == 0 and (layer > 1 or bottleneck):  # stride 2 or a channel change: 1×1 conv + BN shortcut
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in BN]
    return keys + ["fc.weight", "fc.bias"]


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("name, count", COUNTS.items())
def test_exact_parameter_counts(name, count):
    assert name in MODELS
    assert num_params(build(name, num_classes=1000)) == count


@pytest.mark.parametrize("name", list(COUNTS))
def test_torchvision_names_are_primary_and_the_imagenet_prefix_an_alias(name):
    from kdlab.models import ALIASES, FAMILIES

    assert ALIASES[f"imagenet_{name}"] == name and MODELS.get(f"imagenet_{name}") is MODELS.get(name)
    assert name in FAMILIES["imagenet"][3] and name not in FAMILIES["cifar"][3]
    if name == "resnet18":  # the alias builds the same network, weights included
        torch.manual_seed(0)
        a = build(name, num_classes=5).state_dict()
        torch.manual_seed(0)
        b = build(f"imagenet_{name}", num_classes=5).state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet18_is_no_longer_a_typo_of_resnet8():
    from kdlab.errors import ConfigError
    from kdlab.models.cifar_resnet import CifarResNet
    from kdlab.models.imagenet import ImageNetResNet

    assert isinstance(build("resnet18", num_classes=10), ImageNetResNet)
    assert isinstance(build("resnet8", num_classes=10), CifarResNet)
    with pytest.raises(ConfigError, match="did you mean"):
        build("resnet19")


def test_zoo_listing_says_which_family_each_name_is(cli, capsys):
    from kdlab.commands.zoo import format_listing

    assert cli("zoo", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    fams = {f["family"]: f for f in listing}
    assert {m["name"] for m in fams["imagenet"]["models"]} == set(COUNTS)
    assert {m["name"]: m["params"] for m in fams["imagenet"]["models"]} == COUNTS
    assert next(m for m in fams["cifar"]["models"] if m["name"] == "ResNet50")["params"] == 23_705_252
    out = format_listing(listing)  # what `kdlab zoo` prints
    imagenet, cifar = out.index("[imagenet]"), out.index("[cifar]")
    assert out.index("  resnet50 ") > imagenet > out.index("  ResNet50 ") > cifar
    assert "resnet18         11,689,512   (also: imagenet_resnet18)" in out
    assert "mobilenet_v1      4,231,976   (also: imagenet_mobilenet_v1)" in out


@pytest.mark.parametrize("name, blocks, bottleneck", [
    ("resnet18", (2, 2, 2, 2), False), ("resnet50", (3, 4, 6, 3), True),
])  # fmt: skip
def test_state_dict_keys_are_torchvisions(name, blocks, bottleneck):
    model = build(name, num_classes=1000)
    assert list(model.state_dict()) == torchvision_keys(blocks, bottleneck)
    assert model.state_dict()["layer4.0.downsample.0.weight"].shape == ((2048, 1024, 1, 1) if bottleneck else
                                                                        (512, 256, 1, 1))  # fmt: skip


def test_mobilenet_v1_layout_and_interface():
    model = build("mobilenet_v1", num_classes=10).eval()
    keys = list(model.state_dict())
    assert keys[:6] == ["model.0.0.weight"] + [f"model.0.1.{b}" for b in BN]
    assert "model.13.3.weight" in keys and keys[-2:] == ["fc.weight", "fc.bias"]
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_features(x)
    assert out.logits.shape == (2, 10) and out.pooled.shape == (2, 1024) and out.prepool.shape[:2] == (2, 1024)
    assert model.classifier is model.fc
    assert [s.shape[1] for s in out.stages] == [128, 256, 512, 1024]
    assert (out.preacts[-1] < 0).any()  # before the ReLU, as mdistiller's preact_feats
    torch.testing.assert_close(out.stages[-1], out.prepool)
    torch.testing.assert_close(torch.relu(out.preacts[1]), out.stages[1])
    assert model.stage_norms()[0] is model.model[3][4]
    torch.testing.assert_close(out.logits, model(x))


def test_resnet_interface_small_input():
    model = build("resnet18", num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model.forward_features(x)
    assert out.logits.shape == (2, 7) and out.prepool.shape == (2, 512, 2, 2) and model.classifier is model.fc
    assert [tuple(s.shape[1:]) for s in out.stages] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    torch.testing.assert_close(out.pooled, out.stages[-1].mean(dim=(2, 3)))
    torch.testing.assert_close(torch.relu(out.preacts[2]), out.stages[2])
    assert model.stage_norms()[0] is model.layer1[1].bn2 and model.stage_norms()[3] is model.layer4[1].bn2
    with torch.no_grad():  # the stage outputs are the plain torchvision computation
        torch.testing.assert_close(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))), out.stages[0])


def test_no_clash_with_the_cifar_zoo():
    assert "ResNet50" in MODELS and "resnet50" in MODELS
    assert num_params(build("ResNet50", num_classes=1000)) != COUNTS["resnet50"]


# ---------------------------------------------------------------------------------------------------------------
# torchvision-style .pth teachers


def _as_torchvision_pth(src: Path, dst: Path) -> Path:
    """A plain state-dict .pth as torchvision publishes it (old files: no BN num_batches_tracked)."""
    from kdlab.engine.checkpoint import load_weights_file

    state = {k: v for k, v in load_weights_file(src).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, dst)
    return dst


class _Evil:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['KDLAB_PWNED'], 'w').write('x')",))


def test_pth_teacher_distills_like_the_safetensors_one(tmp_path, teacher_run, cli, capsys):
    pth = _as_torchvision_pth(teacher_run / "model.safetensors", tmp_path / "teacher-0123abcd.pth")
    kd = CONFIGS / "mnist1d" / "student_kd.yaml"
    small = [*SMALL, "train.epochs=1"]
    assert cli("distill", kd, "--out", tmp_path / "a", "--quiet", f"teacher.checkpoint={pth}", *small) == 0
    assert cli("distill", kd, "--out", tmp_path / "b", "--quiet", f"teacher.checkpoint={teacher_run}", *small) == 0
    a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in "ab")
    assert a["teacher_test_acc"] == b["teacher_test_acc"] and a["final_test_acc"] == b["final_test_acc"]
    # top-5 everywhere: summary, metrics rows (jsonl and csv)
    for key in ("final_test_top5", "best_test_top5", "teacher_test_top5"):
        assert 0.0 <= a[key] <= 100.0
    assert a["final_test_top5"] >= a["final_test_acc"]
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["test_top5"] >= row["test_acc"]
    assert "test_top5" in (tmp_path / "a" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert cli("eval", tmp_path / "a", "--json") == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["top5"] == pytest.approx(a["final_test_top5"])
    # the same file converts to safetensors (missing BatchNorm counters filled) with identical weights
    assert cli("import-checkpoint", pth, "--arch", "mnist1d_cnn", "--out", tmp_path / "t.safetensors") == 0
    from kdlab.engine.checkpoint import load_weights_file

    ref, got = load_weights_file(teacher_run / "model.safetensors"), load_weights_file(tmp_path / "t.safetensors")
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref if "num_batches" not in k)


def test_malicious_pth_teacher_refused_without_running_it(tmp_path, teacher_run, cli, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("KDLAB_PWNED", str(marker))
    evil = tmp_path / "resnet34-b627a593.pth"
    torch.save({"fc.weight": _Evil()}, evil)  # a zip .pth whose pickle would run code on a plain torch.load
    code = cli("distill", CONFIGS / "mnist1d" / "student_kd.yaml", "--out", tmp_path / "run", "--quiet",
               f"teacher.checkpoint={evil}", *SMALL)  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not marker.exists() and not (tmp_path / "run").exists()
    assert len(err) == 1 and err[0].startswith("kdlab: error:") and "refused to unpickle" in err[0]


def test_top5_counts_and_few_classes():
    from kdlab.engine.evaluation import topk_correct

    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    y = torch.tensor([2, 2])  # rank 5 in row 0 (in the top-5), rank 3 in row 1
    assert int(topk_correct(logits, y, 5)) == 2 and int(topk_correct(logits, torch.tensor([1, 6]), 5)) == 0
    assert int(topk_correct(logits[:, :3], torch.tensor([0, 1]), 5)) == 2  # ≤ 5 classes: always correct


def test_compare_and_tables_show_top5_next_to_the_papers(tmp_path):
    import yaml

    from kdlab.pipelines.compare import compare_rows, comparison_csv, comparison_markdown

    cfg = {"model": {"name": "resnet18"}, "method": {"name": "ce"}, "data": {"name": "imagenet"},
           "meta": {"paper": "made-up table", "paper_top1": 69.75, "paper_top5": 89.07}}  # fmt: skip
    for seed, (top1, top5) in enumerate([(70.0, 89.5), (70.5, 89.9)]):
        run = tmp_path / f"r_seed{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(dict(cfg, seed=seed)))
        (run / "summary.json").write_text(json.dumps({"final_test_acc": top1, "best_test_acc": top1, "epochs": 1,
                                                      "final_test_top5": top5, "best_test_top5": top5}))  # fmt: skip
    rows = compare_rows([tmp_path])
    assert len(rows) == 1 and rows[0]["best_top5"].mean == pytest.approx(89.7)
    assert rows[0]["delta_best_top5"] == pytest.approx(89.7 - 89.07)
    md = comparison_markdown(rows)
    assert "ours best top-5 %" in md and "89.70 ± 0.28" in md and "89.07" in md
    assert "paper_top5" in comparison_csv(rows).splitlines()[0]


def test_sweep_tables_carry_top5():
    from kdlab.pipelines.tables import CellResult, rows, stage_markdown

    cells = [CellResult("s", (("m", name),), 2, [{"final_test_acc": a, "best_test_acc": a, "best_test_top5": a + 20}
                                                 for a in (70.0, 72.0)], meta={"paper_top1": 71.0, "paper_top5": 90.0})
             for name in ("kd", "dkd")]  # fmt: skip
    md = stage_markdown(cells)
    header = md.splitlines()[0]
    assert "best top-5 %" in header and "paper top-5" in header and "Δ best top-5 − paper" in header
    assert "91.00 ± 1.41" in md and "+1.00" in md
    flat = rows(cells)[0]
    assert flat["best_test_top5_mean"] == 91.0 and flat["paper_top5"] == 90.0
