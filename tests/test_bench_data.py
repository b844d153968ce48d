"""``kdlab bench --suite data``: the three pipelines on the same images, the JSON it writes, the reference's
transforms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL.Image")


def test_bench_data_suite_times_three_pipelines_on_the_same_images(tmp_path, capsys):
    from kdlab.cli import main

    root = tmp_path / "f"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split in ("train", "val"):
            (root / split / c).mkdir(parents=True)
        for i in range(10):
            PIL.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.jpg")
    out = tmp_path / "bench.json"
    code = main(["bench", "--suite", "data", "--root", str(root), "--images", "12", "--workers", "1", "--rounds", "1",
                 "--batch-size", "4", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("reference_img_s", "folder_img_s", "webdataset_img_s", "reference_eval_img_s", "folder_eval_img_s",
                "webdataset_eval_img_s", "workers", "image_size", "num_images", "rounds"):  # fmt: skip
        assert key in res, key
    assert (res["num_images"], res["workers"], res["image_size"], res["rounds"]) == (12, 1, 224, 1)
    assert all(res[f"{p}_img_s"] > 0 for p in ("reference", "folder", "webdataset"))
    stages = res["breakdown_ms_per_image"]
    assert {"read + decode", "crop + resize", "to float + normalise", "collate"} <= set(stages["reference"])
    assert "| (b) kdlab image folder, uint8 |" in printed and "where the time goes" in printed


def test_reference_follows_torchvision_transforms():
    """The reference's train view is a crop of the image resized to 224 (maybe mirrored), float32 and normalised
    with ImageNet's statistics; its eval view is the resize-256 centre-crop-224."""
    from kdlab.benchdata import ReferenceImageFolder
    from kdlab.data.images import IMAGENET_MEAN, IMAGENET_STD

    a = np.full((375, 500, 3), 128, np.uint8)
    a[:, 250:] = 200
    ref = ReferenceImageFolder([], [], train=True)
    img = PIL.fromarray(a)
    torch.manual_seed(0)
    x = ref.to_normalized_tensor(ref.random_resized_crop(img))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    centre = np.asarray(ref.resize_center_crop(img))
    assert centre.shape == (224, 224, 3)
    assert centre[:, 0, 0].tolist() == [128] * 224 and centre[:, -1, 0].tolist() == [200] * 224
    expect = (128 / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    y = ref.to_normalized_tensor(PIL.fromarray(np.full((2, 2, 3), 128, np.uint8)))
    assert abs(float(y[0, 0, 0]) - expect) < 1e-6
