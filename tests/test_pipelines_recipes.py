"""Every CIFAR-100 recipe and study spec validates: ``kdlab train/distill/sweep/chain --dry-run`` builds data, models
and method and exits 0, on a tiny fake CIFAR-100 folder and teacher checkpoints made here (untrained)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS, dry_runs_in_two_workers

CIFAR = CONFIGS / "cifar100"


def _recipes() -> list[Path]:
    out = []
    for p in sorted(CIFAR.rglob("*.yaml")):
        if p.name == "base.yaml" or p.name.startswith("_"):
            continue  # shared bases and method sections, not runnable on their own
        out.append(p)
    return out


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake_cifar100")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 32)):
        images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        np.savez(root / f"{split}.npz", images=images, fine_labels=np.arange(n) % 100)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """A teacher .safetensors per architecture, made on first use (its randomly initialised weights zero-filled)."""
    from kdlab.engine import checkpoint as ck
    from kdlab.models import build

    folder = tmp_path_factory.mktemp("teachers")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            torch.manual_seed(0)
            made[arch] = folder / f"{arch}.safetensors"
            # under `no_weight_init` the randomly initialised weights are zeros (finite, as teachers must be)
            ck.save_weights(made[arch], build(arch, num_classes=100).state_dict())
        return made[arch]

    return get


def _overrides(path: Path, fake_cifar: Path, checkpoints) -> list[str]:
    from kdlab.config import read_recipe, read_yaml
    from kdlab.pipelines.spec import is_spec

    ov = [f"data.root={fake_cifar}", "train.device=cpu", "train.threads=1"]
    raw = read_yaml(path)
    recipes = [path]
    if is_spec(raw):
        if "stages" in raw:
            return ov  # the chain's teachers are its own stages (built with random weights by the dry run)
        recipes = [path.parent / raw["recipe"]]
    teachers = {(read_recipe(r).get("teacher") or {}).get("name") for r in recipes} - {None}
    members = [m for r in recipes for m in ((read_recipe(r).get("teacher") or {}).get("ensemble") or [])]
    assert len(teachers) <= 1, f"{path}: stages with recipe teachers of different architectures"
    if teachers:
        ov.append(f"teacher.checkpoint={checkpoints(teachers.pop())}")
    if members:
        items = ", ".join(f"{{name: {m['name']}, checkpoint: {checkpoints(m['name'])}}}" for m in members)
        ov.append(f"teacher.ensemble=[{items}]")
    return ov


def test_every_cifar100_recipe_dry_runs(fake_cifar, checkpoints, no_weight_init, tmp_path):
    from kdlab.config import read_recipe, read_yaml
    from kdlab.methods import METHODS
    from kdlab.pipelines.spec import is_spec, load_plan

    recipes = _recipes()
    scanned = {p.resolve() for p in recipes}
    assert len(recipes) > 200  # the paper families (see docs/studies.md)
    failures, jobs = [], []
    for i, path in enumerate(recipes):
        raw = read_yaml(path)
        ov = _overrides(path, fake_cifar, checkpoints)  # teacher checkpoints are made here, before the workers start
        stages = raw.get("stages") if is_spec(raw) else None
        if stages and len(stages) > 20 and all((path.parent / st["recipe"]).resolve() in scanned for st in stages):
            # a whole table as a chain of recipes that are each dry-run here (logit_std/table2_with_teachers: 117
            # stages): its wiring is checked by expanding every run's config (teachers injected), not by building
            # every model a second time; small chains are dry-run as they are
            tasks = load_plan(path, overrides=ov).expand(tmp_path / f"p{i}")
            assert len(tasks) >= len(stages) and not (tmp_path / f"p{i}").exists()
            continue
        if is_spec(raw):
            cmd = "chain" if "stages" in raw else "sweep"
            args = [cmd, path, *ov, "--dry-run", "--out", tmp_path / f"p{i}"]
        else:
            method = (read_recipe(path).get("method") or {}).get("name", "ce")
            cmd = "distill" if METHODS.get(method).needs_teacher else "train"
            args = [cmd, path, *ov, "--dry-run", "--out", tmp_path / f"r{i}"]
        jobs.append((path, [str(a) for a in args]))
    results = dry_runs_in_two_workers([args for _, args in jobs])
    for (path, _), (code, out, err) in zip(jobs, results):
        if code != 0 or "dry run ok" not in out:
            failures.append(f"{path.relative_to(CIFAR)}: exit {code}: {err.strip()[-300:]}")
    assert not failures, "\n".join(failures)
    assert not any(tmp_path.iterdir()), "a dry run wrote into its --out folder"


def test_recipes_record_paper_numbers():
    """Every recipe of the paper families names its source in meta.paper; numbers are plausible top-1 values."""
    from kdlab.config import read_recipe, read_yaml
    from kdlab.pipelines.spec import is_spec, load_plan

    n_numbers = 0
    for path in _recipes():
        if path.parent == CIFAR:
            continue  # recipes of other families (top-level files)
        raw = read_yaml(path)
        if is_spec(raw):  # every run of a sweep/chain carries a source (from the spec, its stages or recipes)
            for task in load_plan(path).expand(Path("/nonexistent")):
                assert task.cfg.meta.get("paper"), f"{path}: run {task.out} has no meta.paper"
                top1 = task.cfg.meta.get("paper_top1")
                assert top1 is None or 40 < top1 < 90, path
            continue
        meta = read_recipe(path).get("meta") or {}
        assert meta.get("paper"), f"{path}: meta.paper missing"
        top1 = meta.get("paper_top1")
        if top1 is not None:
            assert 40 < top1 < 90, path
            n_numbers += 1
    assert n_numbers > 200


# (method, teacher, student) of every baseline row of the three comparison tables, per recipe folder
BASELINE_TABLES = {
    "logit_std": [  # logit-standardization-in-kd Table 2 (same-architecture pairs)
        (m, t, s) for m in ("fitnet", "at", "rkd", "crd", "ofd", "reviewkd", "simkd", "catkd")
        for t, s in (("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("wrn_40_2", "wrn_40_1"), ("wrn_40_2", "wrn_16_2"),
                     ("resnet56", "resnet20"), ("resnet110", "resnet32"), ("resnet110", "resnet20"))
    ],
    "ijckd": [  # ideal-joint-classifier-kd Table 1 (SRRL / SimKD rows: the existing srrl_* / simkd_* recipes)
        (m, t, s) for m in ("fitnet", "kd", "vid", "rkd", "pkt", "ofd", "crd", "wsld", "dkd", "srrl", "simkd")
        for t, s in (("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
                     ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("resnet32x4", "ShuffleV1"),
                     ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1"))
    ],
    "kl_mse": [  # kl-vs-mse-in-kd's comparison of KD methods (FitNets, AT, FT, AB, Overhaul = OFD), WRN-28-4 teacher
        (m, "wrn_28_4", s) for m in ("fitnet", "at", "ft", "ab", "ofd") for s in ("wrn_16_2", "wrn_16_4", "wrn_28_2")
    ],
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(BASELINE_TABLES))
def test_every_baseline_row_of_the_comparison_tables_has_a_recipe(family):
    """One recipe per (method, pair) of the tables, running that method on that pair and storing the paper's number
    (the dry run of each is part of test_every_cifar100_recipe_dry_runs)."""
    from kdlab.config import read_recipe

    for method, teacher, student in BASELINE_TABLES[family]:
        path = CIFAR / family / f"{method}_{teacher}_{student}.yaml"
        assert path.is_file(), f"missing {path.relative_to(CIFAR)}"
        raw = read_recipe(path)
        assert (raw["method"]["name"], raw["teacher"]["name"], raw["model"]["name"]) == (method, teacher, student), path
        paper = {"logit_std": "logit-standardization", "ijckd": "ideal-joint-classifier", "kl_mse": "kl-vs-mse"}[family]
        assert 40 < raw["meta"]["paper_top1"] < 90 and raw["meta"]["paper"].startswith(paper), path
