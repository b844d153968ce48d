"""Every ImageNet and CIFAR-10 recipe dry-runs (``kdlab train/distill --dry-run`` exits 0), on a fake 1000-class
image folder and fake torchvision teacher files (named as torchvision names them) made here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, dry_runs_in_two_workers

IMAGENET = CONFIGS / "imagenet"
CIFAR10 = CONFIGS / "cifar10"


def _recipes(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*.yaml")) if p.name != "base.yaml" and not p.name.startswith("_")]


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ and val/ with 1000 class folders of one tiny PNG each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fake_imagenet")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    for split in ("train", "val"):
        for c in range(1000):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True)
            (d / "img.png").write_bytes(png)
    return root


@pytest.fixture(scope="module")
def fake_torchvision_teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plain state-dict .pth files under torchvision's file names; every float tensor is a view of one zero buffer,
    so a 60 M-parameter ResNet-152 file takes a few MB."""
    import yaml

    from kdlab.models import build

    folder = tmp_path_factory.mktemp("tv_teachers")
    wanted = {}
    for p in _recipes(IMAGENET):
        t = yaml.safe_load(p.read_text()).get("teacher")
        if t:
            wanted[t["checkpoint"].split("/")[-1]] = t["name"]
    with torch.device("meta"):
        shapes = {f: {k: (v.shape, v.dtype) for k, v in build(n, num_classes=1000).state_dict().items()}
                  for f, n in wanted.items()}  # fmt: skip
    for file, state in shapes.items():
        big = torch.zeros(max(int(np.prod(s)) for s, _ in state.values()))
        torch.save({k: (big[: int(np.prod(s))].view(s) if d.is_floating_point else torch.zeros(s, dtype=d))
                    for k, (s, d) in state.items()}, folder / file)  # fmt: skip
    assert len(wanted) == 3 and all((folder / f).stat().st_size < 20e6 for f in wanted)
    return folder


def _dry_run(path: Path, overrides: list[str], out: Path, capsys) -> str | None:
    from kdlab.cli import main
    from kdlab.config import read_recipe
    from kdlab.methods import METHODS

    method = (read_recipe(path).get("method") or {}).get("name", "ce")
    cmd = "distill" if METHODS.get(method).needs_teacher else "train"
    code = main([cmd, str(path), *overrides, "--dry-run", "--out", str(out)])
    got = capsys.readouterr()
    return None if code == 0 and "dry run ok" in got.out else f"{path.name}: exit {code}: {got.err.strip()[-300:]}"


def test_every_imagenet_recipe_dry_runs(fake_imagenet, fake_torchvision_teachers, monkeypatch, tmp_path):
    from kdlab.config import read_recipe
    from kdlab.methods import METHODS

    monkeypatch.setenv("KDLAB_IMAGENET_TEACHERS", str(fake_torchvision_teachers))  # the workers inherit it
    recipes = _recipes(IMAGENET)
    assert len(recipes) >= 51  # 5 label-trained, 28 logit-std Table 3, 14 ijckd Table 4, 4 kl-vs-mse Table 5
    ov = [f"data.root={fake_imagenet}", "data.workers=0", "data.image_size=64", "train.device=cpu", "train.threads=1"]
    commands = []
    for i, p in enumerate(recipes):
        method = (read_recipe(p).get("method") or {}).get("name", "ce")
        cmd = "distill" if METHODS.get(method).needs_teacher else "train"
        commands.append([cmd, str(p), *ov, "--dry-run", "--out", str(tmp_path / f"r{i}")])
    failures = [f"{p.name}: exit {code}: {err.strip()[-300:]}"
                for p, (code, out, err) in zip(recipes, dry_runs_in_two_workers(commands))
                if code != 0 or "dry run ok" not in out]  # fmt: skip
    assert not failures, "\n".join(failures)
    assert not any(tmp_path.iterdir()), "a dry run wrote into its --out folder"


def test_imagenet_recipes_record_the_papers_top1_and_top5():
    from kdlab.config import read_recipe

    n5 = 0
    for p in _recipes(IMAGENET):
        cfg = read_recipe(p)
        meta = cfg.get("meta") or {}
        assert meta.get("paper"), p
        top1, top5 = meta.get("paper_top1"), meta.get("paper_top5")
        assert top1 is None or 60 < top1 < 80, p
        if top5 is not None:
            assert top1 is not None and top1 < top5 < 95, p
            n5 += 1
        if cfg.get("teacher"):  # teachers are torchvision's weight files, found through $KDLAB_IMAGENET_TEACHERS
            assert cfg["teacher"]["checkpoint"].startswith("${KDLAB_IMAGENET_TEACHERS:-"), p
            assert cfg["teacher"]["checkpoint"].endswith(".pth"), p
    assert n5 == 46  # logit-standardization Table 3 (28) + ideal-joint-classifier Table 4 (14) + 4 label-trained


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_cifar10")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 20)):
        np.savez(root / f"{split}.npz", images=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)  # fmt: skip
    return root


def test_every_cifar10_recipe_dry_runs(fake_cifar10, no_weight_init, tmp_path, capsys):
    from kdlab.config import read_recipe
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    recipes = _recipes(CIFAR10)
    assert len(recipes) >= 15
    failures = []
    for i, p in enumerate(recipes):
        ov = [f"data.root={fake_cifar10}", "train.device=cpu", "train.threads=1"]
        teacher = (read_recipe(p).get("teacher") or {}).get("name")
        if teacher:
            path = tmp_path / "teachers" / f"{teacher}.safetensors"
            if not path.exists():
                path.parent.mkdir(exist_ok=True)
                state = build(teacher, num_classes=10).state_dict()  # zeros: init is zero-filled (no_weight_init)
                ck.save_weights(path, {k: torch.zeros_like(v) for k, v in state.items()})
            ov.append(f"teacher.checkpoint={path}")
        if f := _dry_run(p, ov, tmp_path / f"r{i}", capsys):
            failures.append(f)
    assert not failures, "\n".join(failures)
