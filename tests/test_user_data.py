"""User datasets are validated, never repaired (issue 19 §4, :mod:`kdlab.data.user`).

The command-line cases (one line, exit 2) are rows of ``CASES`` in test_cli.py; these pin the checks themselves:
where they look, which sample they name, and that streamed samples are checked in the DataLoader worker.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset as TorchDataset

from kdlab.config import DataConfig
from kdlab.data import user
from kdlab.data.user import build_user_dataset, check_features, check_labels
from kdlab.errors import DataError
from kdlab.trust import trusting


def test_labels_integer_valued_one_dimensional_in_range():
    y = check_labels(torch.tensor([0.0, 3.0, 9.0]), 10, "d train split")
    assert y.dtype == torch.int64 and y.tolist() == [0, 3, 9]  # integer-valued floats are class indices
    for labels, message in (
        (torch.tensor([0.0, 9.9, 1.0]), "d train split sample 1: label 9.9 is not an integer class index"),
        (torch.tensor([0.0, float("nan")]), "d train split sample 1: label nan is not an integer class index"),
        (torch.tensor([[0], [1]]), r"labels must be 1-D \(one class index per sample\), got shape \(2, 1\)"),
        (torch.tensor([0, 1, -1]), r"sample 2: label -1 is outside \[0, 10\)"),
        (torch.tensor([0, 10]), r"sample 1: label 10 is outside \[0, 10\)"),
        (torch.tensor([True, False]), "labels must be integer class indices, got dtype torch.bool"),
    ):
        with pytest.raises(DataError, match=message):
            check_labels(labels, 10, "d train split")


def test_features_finite_names_the_first_bad_sample_across_chunks(monkeypatch):
    monkeypatch.setattr(user, "_CHECK_ELEMENTS", 8)  # 2 samples of 4 values per chunk: the index crosses chunks
    x = torch.zeros(10, 4)
    check_features(x, "d")
    check_features(torch.zeros(3, 4, dtype=torch.uint8), "d")
    x[7, 2] = -float("inf")
    x[9, 0] = float("nan")
    with pytest.raises(DataError, match=r"d sample 7: input is not finite \(-inf\)"):
        check_features(x, "d")
    with pytest.raises(DataError, match="inputs must be real numbers"):
        check_features(torch.zeros(2, 2, dtype=torch.complex64), "d")


class _Items(TorchDataset):
    def __init__(self, bad_at: int | None = None) -> None:
        self.bad_at = bad_at

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int):
        x = torch.full((40,), float(i % 3))
        if i == self.bad_at:
            x[4] = float("inf")
        return x, i % 3


def _stream(test: TorchDataset, skip: bool = False, train=None):
    def builder(cfg):
        return {"train": _Items() if train is None else train, "test": test, "num_classes": 3}

    cfg = DataConfig.model_construct(name="user_data:build", workers=1, prefetch=2, skip_bad_images=skip)
    with trusting():
        return build_user_dataset(cfg, builder)


def test_streamed_samples_are_checked_in_the_worker_and_named():
    ds = _stream(_Items(bad_at=6))
    with pytest.raises(DataError, match=r"test split sample 6: input is not finite \(inf\)"):
        for _ in ds.eval_batches("test", 4):
            pass
    ds = _stream(_Items(bad_at=6), skip=True)  # data.skip_bad_images: left out and counted, like a corrupt image
    seen = torch.cat([idx for _, _, idx in ds.eval_batches("test", 4)])
    assert 6 not in seen.tolist() and len(seen) == 11 and list(ds.skipped) == [("test", 6)]


def test_a_tensor_pair_beside_a_dataset_is_still_checked_when_built():
    x, y = torch.zeros(8, 40), torch.arange(8) % 3
    x[5, 0] = float("nan")
    with pytest.raises(DataError, match="train split sample 5: input is not finite"):
        _stream(_Items(), train=(x, y))
    with pytest.raises(DataError, match=r"train split sample 2: label 2.5"):
        _stream(_Items(), train=(torch.zeros(8, 40), torch.tensor([0, 1, 2.5, 0, 1, 2, 0, 1])))
