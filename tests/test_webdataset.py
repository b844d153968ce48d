"""WebDataset shards: export, reading (every sample once per epoch over ranks × workers), resume, damage, caches."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS

PIL = pytest.importorskip("PIL.Image")

RECIPE = CONFIGS / "cifar100" / "resnet8.yaml"
FAST = ["train.threads=1", "train.progress=false", "train.batch_size=8", "train.eval_batch_size=16", "--quiet"]


def kdlab(capsys, *args) -> tuple[int, str, str]:
    from kdlab.cli import main
    from kdlab.trust import set_trust

    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    finally:
        set_trust(None)
    out, err = capsys.readouterr()
    return code, out, err


def cifar(root: Path, n_train: int = 40, n_test: int = 12, classes: int = 4, size: int = 32) -> Path:
    """A CIFAR-style train.npz / test.npz whose colour depends on the class (learnable)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        y = np.arange(n) % classes
        x = (rng.integers(0, 60, (n, size, size, 3)) + (190 // classes) * y[:, None, None, None]).astype(np.uint8)
        np.savez(root / f"{split}.npz", images=x, fine_labels=y)
    return root


def export(capsys, src: Path, out: Path, *extra) -> Path:
    code, _, err = kdlab(capsys, "export-images", src, "--out", out, "--format", "webdataset", *extra)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A CIFAR export of 40 + 12 samples in shards of 6 (7 + 2 shards, the last ones partial)."""
    from kdlab.cli import main

    tmp = tmp_path_factory.mktemp("wds")
    args = ["export-images", str(cifar(tmp / "c")), "--out", str(tmp / "s"), "--format", "webdataset", "--shard-size", "6"]
    assert main(args) == 0
    return tmp / "s"


def _data(root: Path, **kw):
    from kdlab.config import DataConfig
    from kdlab.data import build_dataset

    return build_dataset(DataConfig(name="webdataset", root=str(root), **{"workers": 0, **kw}))


def _views(ds, **kw) -> dict[int, torch.Tensor]:
    return {int(i): x[k] for x, _, idx in ds.train_batches(**kw) for k, i in enumerate(idx)}


# ---- export ----------------------------------------------------------------------------------------------------------


def test_cifar_export_is_readable_by_webdataset_and_holds_every_image_once(shards, tmp_path):
    import webdataset as wds

    meta = json.loads((shards / "dataset.json").read_text())
    assert meta["num_classes"] == 100 and meta["transform"] == "cifar"  # CIFAR-100: its 100 classes
    assert [s["count"] for s in meta["splits"]["train"]["shards"]] == [6] * 6 + [4]
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(7)] + \
        ["val-000000.tar", "val-000001.tar"]  # fmt: skip
    got = {}
    for s in wds.WebDataset(str(shards / "train-{000000..000006}.tar"), shardshuffle=False):  # the package's reader
        got[s["__key__"]] = (np.asarray(PIL.open(io.BytesIO(s["png"]))), int(s["cls"]))
    assert sorted(got) == [f"{i:06d}" for i in range(40)]
    with np.load(shards.parent / "c" / "train.npz") as z:
        source = {hashlib.sha1(img.tobytes()).hexdigest(): int(y) for img, y in zip(z["images"], z["fine_labels"])}
    exported = {hashlib.sha1(a.tobytes()).hexdigest(): y for a, y in got.values()}
    assert exported == source  # lossless, every image once, with its label
    labels = [y for s in meta["splits"]["train"]["shards"] for y in s["labels"]]
    assert labels == [got[f"{i:06d}"][1] for i in range(40)]  # dataset.json's labels in key order
    assert sorted(labels) != labels  # written in a seeded random order: shards mix the classes


def test_image_folder_export_copies_files_byte_for_byte_with_sorted_class_indices(tmp_path, capsys):
    root = tmp_path / "f"
    for split, n in (("train", 3), ("val", 1)):
        for c in ("zebra", "ant"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                PIL.fromarray(np.full((9, 7, 3), 40 * i + (c == "zebra") * 100, np.uint8)).save(
                    root / split / c / f"{i}.jpg")
    out = export(capsys, root, tmp_path / "s", "--shard-size", "4")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["classes"] == ["ant", "zebra"]
    files = {hashlib.sha1(p.read_bytes()).hexdigest(): int(p.parent.name == "zebra")
             for p in (root / "train").rglob("*.jpg")}  # fmt: skip
    members = {}
    for shard in sorted(out.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            assert names[0] == "__kdlab__"
            for name in names[1:]:
                if name.endswith(".jpg"):
                    key = name[: -len(".jpg")]
                    data = tar.extractfile(name).read()
                    members[hashlib.sha1(data).hexdigest()] = int(tar.extractfile(f"{key}.cls").read())
    assert members == files
    code, _, err = kdlab(capsys, "export-images", root, "--out", tmp_path / "png")  # already a folder
    assert code == 2 and "--format webdataset" in err


# ---- reading ---------------------------------------------------------------------------------------------------------


def test_every_sample_once_per_epoch_seeded_order_and_views_independent_of_workers(shards):
    ds, ds2 = _data(shards), _data(shards, workers=2)
    assert (ds.num_train, ds.split_size("test"), ds.num_classes, ds.input_shape) == (40, 12, 100, (3, 32, 32))
    a = _views(ds, batch_size=5, seed=3, epoch=2)
    b = _views(ds2, batch_size=7, seed=3, epoch=2)
    assert sorted(a) == list(range(40)) and sorted(b) == list(range(40))
    assert all(torch.equal(a[i], b[i]) for i in a)  # a sample's view: (seed, epoch, index), not the worker or batch
    order = lambda ep: [int(i) for _, _, idx in ds2.train_batches(8, seed=3, epoch=ep) for i in idx]  # noqa: E731
    assert order(2) == order(2) and order(2) != order(3)
    for x, y, idx in ds2.train_batches(8, seed=0, epoch=1):
        assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, ds2.labels("train")[idx])
    ev = [idx for _, _, idx in ds2.eval_batches("test", 5)]
    assert torch.cat(ev).tolist() == list(range(12))  # evaluation in order, over both workers
    sub = torch.tensor([1, 4, 5, 11])
    assert torch.cat([i for _, _, i in ds2.eval_batches("test", 3, sub)]).tolist() == sub.tolist()


def test_ranks_and_workers_split_every_epoch_exactly_and_a_resumed_epoch_is_identical(shards):
    from kdlab.engine.distributed import DistInfo, shard

    ds = _data(shards, workers=2)
    per_rank, counts = [], []
    for rank in (0, 1):
        info = DistInfo(rank=rank, world=2, local_rank=rank)
        batches = list(ds.train_batches(8, seed=1, epoch=4, shard=lambda i, info=info: shard(i, info)))
        per_rank.append([int(i) for _, _, idx in batches for i in idx])
        counts.append([len(b[2]) for b in batches])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))
    assert counts[0] == counts[1] == [4] * 5  # each rank its half of every global batch: DDP steps line up
    full = [(x, idx) for x, _, idx in ds.train_batches(6, seed=1, epoch=4)]
    tail = [(x, idx) for x, _, idx in ds.train_batches(6, seed=1, epoch=4, start_batch=3)]
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_see_each_key_once(shards, tmp_path):
    """Two gloo processes, two workers each, two epochs: every sample key is read exactly once per epoch."""
    script = tmp_path / "ranks.py"
    script.write_text(f'''
import json, os, torch, torch.distributed as dist
from kdlab.config import DataConfig
from kdlab.data import build_dataset
from kdlab.engine.distributed import DistInfo, shard
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
info = DistInfo(rank=rank, world=world, local_rank=rank)
ds = build_dataset(DataConfig(name="webdataset", root={str(shards)!r}, workers=2))
seen = {{}}
for epoch in (1, 2):
    seen[epoch] = [int(i) for _, _, idx in ds.train_batches(8, seed=0, epoch=epoch, shard=lambda i: shard(i, info))
                   for i in idx]
    dist.barrier()
with open(os.path.join({str(tmp_path)!r}, f"seen.{{rank}}"), "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
''')
    from test_distributed import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(script)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    seen = [json.loads((tmp_path / f"seen.{r}").read_text()) for r in (0, 1)]
    for epoch in ("1", "2"):
        keys = seen[0][epoch] + seen[1][epoch]
        assert sorted(keys) == list(range(40)) and len(seen[0][epoch]) == len(seen[1][epoch]) == 20
    assert seen[0]["1"] != seen[0]["2"]


def test_train_and_eval_through_the_cli_then_a_teacher_cache_keyed_by_sample(shards, tmp_path, capsys):
    from kdlab.config import load_config
    from kdlab.engine.teacher_cache import TeacherCache, build_cache
    from kdlab.engine.trainer import Trainer

    out = tmp_path / "run"
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=webdataset", f"data.root={shards}", "data.workers=2",
                         "train.epochs=2", *FAST, "--out", out)  # fmt: skip
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["dataset"] == "webdataset" and s["skipped_images"] == {"train": 0, "test": 0}
    code, stdout, err = kdlab(capsys, "eval", out, "--json")
    assert code == 0 and json.loads(stdout)["n"] == 12, err

    base = {"data": {"name": "webdataset", "root": str(shards), "workers": 1}, "model": {"name": "resnet8"},
            "teacher": {"name": "resnet8", "checkpoint": str(out / "model.safetensors")}, "method": {"name": "kd"},
            "train": {"epochs": 1, "batch_size": 8, "progress": False, "threads": 1}}  # fmt: skip
    tr = Trainer(load_config(None, [], base=base), tmp_path / "live")
    cache = build_cache(tr.teacher, tr.data, views=1, out=tmp_path / "c.safetensors", augment_seed=0,
                        dtype=torch.float32, batch_size=16)  # fmt: skip
    rows = TeacherCache(cache).outputs(1, torch.tensor([0, 17, 39])).logits
    x = {int(i): v for v, _, idx in tr.data.train_batches(8, seed=5, epoch=1, augment_seed=0, augment_epoch=1)
         for i, v in zip(idx, v)}  # the same views in another (shuffled) order  # fmt: skip
    with torch.inference_mode():
        live = tr.teacher.forward_features(torch.stack([x[0], x[17], x[39]])).logits
    assert torch.allclose(rows, live, atol=1e-4)  # row i is sample i's view, whatever order it was read in
    assert TeacherCache(cache).info.meta["samples"] == tr.data.sample_keys


def test_urls_brace_patterns_lists_file_urls_and_trusted_pipe_commands_read_the_same_samples(shards):
    from kdlab.trust import trusting

    ref = [(x, i) for x, _, i in _data(shards).eval_batches("test", 5)]
    specs = [
        {"train": f"{shards}/train-{{000000..000006}}.tar", "val": [f"file://{shards}/val-000000.tar",
                                                                     f"{shards}/val-000001.tar"]},
        {"train": f"pipe:cat {shards}/train-{{000000..000006}}.tar", "val": f"pipe:cat {shards}/val-{{000000..000001}}.tar"},
    ]  # fmt: skip
    for urls in specs:
        with trusting():
            ds = _data(shards / "dataset.json", urls=urls)
            got = [(x, i) for x, _, i in ds.eval_batches("test", 5)]
            assert sorted(int(i) for _, _, idx in ds.train_batches(8, seed=0, epoch=1) for i in idx) == list(range(40))
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got)) and len(got) == 3
    with pytest.raises(Exception, match="is not train-000002.tar"):
        _data(shards, urls={"train": [f"{shards}/train-{i:06d}.tar" for i in (0, 1, 3, 2, 4, 5, 6)],
                            "val": f"{shards}/val-{{000000..000001}}.tar"})  # fmt: skip


# ---- damage ----------------------------------------------------------------------------------------------------------


def _rewrite(shard: Path, edit) -> None:
    """Rewrite a shard's members through ``edit(list of (name, bytes)) -> list``."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _other_export(root: Path, capsys) -> Path:
    return export(capsys, cifar(root.parent / "c10", classes=3), root.parent / "other", "--shard-size", "6",
                  "--dataset", "cifar10")


def _urls(train: str, r: Path) -> list[str]:
    return [f"data.urls={{train: '{train}', val: '{r}/val-{{000000..000001}}.tar'}}"]


BAD = {  # case: (damage, extra overrides, what the one line names)
    "corrupt shard": (lambda r, c: (r / "train-000000.tar").write_bytes(b"not a tar file" * 100), lambda r: [],
                      ["webdataset shard", "train-000000.tar"]),
    "truncated tar": (lambda r, c: (r / "train-000004.tar").write_bytes((r / "train-000004.tar").read_bytes()[:3000]),
                      lambda r: [], ["train-000004.tar", "after"]),
    "member without a label": (lambda r, c: _rewrite(r / "train-000002.tar", lambda m: [x for x in m if x[0] != "000013.cls"]),
                               lambda r: [], ["train-000002.tar member 000013.*", "without a label"]),
    "shards of different class counts": (lambda r, c: shutil.copy(_other_export(r, c) / "train-000001.tar", r / "train-000001.tar"),
                                         lambda r: [], ["train-000001.tar", "written for 10 classes"]),
    "empty shard list": (lambda r, c: None, lambda r: ["data.urls={train: [], val: [x.tar]}"], ["lists no train shards"]),
    "failing URL": (lambda r, c: None, lambda r: _urls("http://127.0.0.1:9/train-{000000..000006}.tar", r),
                    ["http://127.0.0.1:9/train-000000.tar", "exited with status"]),
    "missing local shard": (lambda r, c: (r / "val-000001.tar").unlink(), lambda r: [], ["val shard not found", "val-000001.tar"]),
    "pipe: without --trust-code": (lambda r, c: None, lambda r: _urls(f"pipe:cat {r}/train-{{000000..000006}}.tar", r),
                                   ["--trust-code", "pipe:"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_damaged_shards_are_one_line_errors_and_leave_no_run(shards, tmp_path, case, capsys, one_thread):
    root = tmp_path / "s"
    shutil.copytree(shards, root)
    spoil, extra, needles = BAD[case]
    spoil(root, capsys)
    out = tmp_path / "run"
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("untouched")
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=webdataset", f"data.root={root}", *extra(root),
                         "data.workers=1", "train.epochs=1", *FAST, "--out", out)  # fmt: skip
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("kdlab: error: "), err
    assert all(n in lines[0] for n in needles), lines[0]
    assert not out.exists() and (old / "keep.txt").read_text() == "untouched"


def test_skip_bad_images_skips_and_counts_what_damage_costs(shards, tmp_path, capsys, one_thread):
    root = tmp_path / "s"
    shutil.copytree(shards, root)
    BAD["member without a label"][0](root, capsys)
    _rewrite(root / "train-000000.tar", lambda m: [(n, b"garbage" if n == "000001.png" else d) for n, d in m])
    BAD["truncated tar"][0](root, capsys)  # shard 4: samples 24..29, about half of them lost
    code, _, err = kdlab(capsys, "train", RECIPE, "data.name=webdataset", f"data.root={root}", "data.workers=2",
                         "data.skip_bad_images=true", "train.epochs=2", *FAST, "--out", tmp_path / "r")  # fmt: skip
    assert code == 0, err
    skipped = json.loads((tmp_path / "r" / "summary.json").read_text())["skipped_images"]
    warned = [line for line in err.splitlines() if "skipped" in line]
    assert skipped["test"] == 0 and 3 <= skipped["train"] <= 8 and len(warned) == skipped["train"]
