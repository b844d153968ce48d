import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdlab.config import DataConfig
from kdlab.data import CIFAR100_MEAN, CIFAR100_STD, ImageAugment, batches, build_dataset
from kdlab.data.cifar import CIFAR10, CIFAR100, read_cifar
from kdlab.errors import DataError
from kdlab.safe_pickle import UnsafePickleError, safe_load

RNG = np.random.default_rng(0)


def _images(n):
    return RNG.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _pickle_batch(images_hwc, labels, key, protocol):
    d = {b"data": images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1), key: list(map(int, labels))}
    return pickle.dumps(d, protocol=protocol)


@pytest.fixture
def tiny100():
    return (_images(6), RNG.integers(0, 100, 6)), (_images(4), RNG.integers(0, 100, 4))


def test_npz_layout(tmp_path, tiny100):
    (x, y), (xt, yt) = tiny100
    np.savez(tmp_path / "train.npz", images=x, fine_labels=y.astype(np.int16), coarse_labels=y // 5)
    np.savez(tmp_path / "test.npz", images=xt, fine_labels=yt.astype(np.int16), coarse_labels=yt // 5)
    ds = build_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.shape == (6, 3, 32, 32)
    assert torch.equal(ds.train.x, torch.from_numpy(x).permute(0, 3, 1, 2))
    assert ds.test.y.tolist() == yt.tolist() and ds.num_classes == 100


@pytest.mark.parametrize("protocol", [2, 4])
def test_official_pickle_folder_and_archive_cifar100(tmp_path, tiny100, protocol):
    (x, y), (xt, yt) = tiny100
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(_pickle_batch(x, y, b"fine_labels", protocol))
    (folder / "test").write_bytes(_pickle_batch(xt, yt, b"fine_labels", protocol))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"] * 100}, protocol=protocol))
    for root in (tmp_path, folder):  # the parent folder or the pickle folder itself
        (a, b), (c, d) = read_cifar(root, CIFAR100)
        assert np.array_equal(a, x.transpose(0, 3, 1, 2)) and b.tolist() == y.tolist()
        assert np.array_equal(c, xt.transpose(0, 3, 1, 2)) and d.tolist() == yt.tolist()
    archive = tmp_path / "arch" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    for root in (archive, archive.parent):
        (a, b), (c, d) = read_cifar(root, CIFAR100)
        assert np.array_equal(a, x.transpose(0, 3, 1, 2)) and d.tolist() == yt.tolist()


def test_official_cifar10_batches_and_archive(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = []
    for i in range(1, 6):
        xi, yi = _images(2), RNG.integers(0, 10, 2)
        parts.append((xi, yi))
        (folder / f"data_batch_{i}").write_bytes(_pickle_batch(xi, yi, b"labels", 2))
    xt, yt = _images(3), RNG.integers(0, 10, 3)
    (folder / "test_batch").write_bytes(_pickle_batch(xt, yt, b"labels", 2))
    ds = build_dataset(DataConfig(name="cifar10", root=str(tmp_path)))
    assert len(ds.train) == 10 and ds.num_classes == 10
    assert ds.train.y.tolist() == [int(v) for _, yi in parts for v in yi]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    (a, b), (c, d) = read_cifar(archive, CIFAR10)
    assert np.array_equal(c, xt.transpose(0, 3, 1, 2)) and len(a) == 10


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/kdlab_pwned_by_pickle",))


def test_malicious_pickle_is_refused_and_payload_never_runs(tmp_path):
    marker = Path("/tmp/kdlab_pwned_by_pickle")
    marker.unlink(missing_ok=True)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    (folder / "test").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused to unpickle 'posix.system'"):
        read_cifar(tmp_path, CIFAR100)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        safe_load(pickle.dumps(torch.nn.Linear(1, 1)))  # any class, not only os.system


def test_missing_and_empty_data_roots(tmp_path):
    with pytest.raises(DataError, match="data root not found"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no data in"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path)))
    with pytest.raises(DataError, match="set data.root"):
        build_dataset(DataConfig(name="cifar100"))
    np.savez(tmp_path / "train.npz", images=np.zeros((0, 32, 32, 3), np.uint8), fine_labels=np.zeros(0, np.int16))
    np.savez(tmp_path / "test.npz", images=np.zeros((0, 32, 32, 3), np.uint8), fine_labels=np.zeros(0, np.int16))
    with pytest.raises(DataError, match="empty"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path)))


def test_labels_out_of_range_are_rejected(tmp_path):
    np.savez(tmp_path / "train.npz", images=_images(2), fine_labels=np.array([0, 100]))
    np.savez(tmp_path / "test.npz", images=_images(2), fine_labels=np.array([0, 1]))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 99\], found \[0, 100\]"):
        build_dataset(DataConfig(name="cifar100", root=str(tmp_path)))


def _reference_augment(img_chw: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """Per-image reference: zero-pad by 4, crop 32×32 at (dy, dx), then flip (torchvision's order)."""
    padded = torch.zeros(3, 40, 40, dtype=img_chw.dtype)
    padded[:, 4:36, 4:36] = img_chw
    crop = padded[:, dy : dy + 32, dx : dx + 32]
    return crop.flip(-1) if flip else crop


def test_batched_augmentation_matches_per_image_reference():
    x = torch.from_numpy(_images(64)).permute(0, 3, 1, 2).contiguous()
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=64)
    p = aug.epoch_params(seed=3, epoch=1, n=64)
    out = aug.crop_flip(x, p)
    for i in range(64):
        ref = _reference_augment(x[i], int(p.dy[i]), int(p.dx[i]), bool(p.flip[i]))
        assert torch.equal(out[i], ref)
    # every offset 0..8 and both flips occur, and about half the images are flipped
    assert set(p.dy.tolist()) <= set(range(9)) and 0.25 < p.flip.float().mean() < 0.75


def test_augmentation_is_seeded_and_a_function_of_seed_epoch_index():
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=100)
    a = aug.epoch_params(0, 1, 100)
    b = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=100).epoch_params(0, 1, 100)
    c = aug.epoch_params(0, 2, 100)
    assert torch.equal(a.dx, b.dx) and torch.equal(a.flip, b.flip)
    assert not torch.equal(a.dx, c.dx)
    x = torch.from_numpy(_images(100)).permute(0, 3, 1, 2).contiguous()
    idx = torch.tensor([5, 17, 3])
    one = aug.train_batch(x[idx], idx, seed=0, epoch=1)
    again = aug.train_batch(x[idx[[1]]], idx[[1]], seed=0, epoch=1)  # same sample in another batch
    assert torch.equal(one[1], again[0])


def test_normalization_constants():
    aug = ImageAugment(CIFAR100_MEAN, CIFAR100_STD, num_samples=1)
    x = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = aug.eval_batch(x)
    expected = [(1 - m) / s for m, s in zip((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))


def test_batches_cover_every_index_once_with_x_y_index():
    ds = build_dataset(DataConfig(name="mnist1d", num_samples=1000))
    seen = []
    for x, y, idx in batches(ds.train, ds.transform, 64, train=True, seed=1, epoch=1):
        assert torch.equal(x, ds.train.x[idx]) and torch.equal(y, ds.train.y[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(len(ds.train)))
    order2 = [i for _, _, idx in batches(ds.train, ds.transform, 64, train=True, seed=1, epoch=2) for i in idx.tolist()]
    assert order2 != seen  # a new shuffle every epoch


def test_mnist1d_default_sizes_cache_and_standardization(_mnist1d_cache):
    ds = build_dataset(DataConfig(name="mnist1d"))
    assert (len(ds.train), len(ds.test), ds.input_shape, ds.num_classes) == (4000, 1000, (40,), 10)
    assert abs(float(ds.train.x.mean())) < 1e-4 and abs(float(ds.train.x.std()) - 1) < 1e-3
    assert list(Path(_mnist1d_cache).glob("mnist1d_n5000_*.npz"))
    again = build_dataset(DataConfig(name="mnist1d"))  # from the cache
    assert torch.equal(again.train.x, ds.train.x)
    small = build_dataset(DataConfig(name="mnist1d", num_samples=500))
    assert (len(small.train), len(small.test)) == (400, 100)


def test_mnist1d_shift_augmentation_is_a_seeded_zero_filled_translation():
    from kdlab.data.augment import VectorTransform

    t = VectorTransform(shift=3, num_samples=10)
    x = torch.arange(1.0, 41.0).repeat(10, 1)
    idx = torch.arange(10)
    out = t.train_batch(x, idx, seed=1, epoch=2)
    shifts = t.epoch_shifts(1, 2)
    assert set(shifts.tolist()) <= set(range(-3, 4)) and len(set(shifts.tolist())) > 1
    for i in range(10):
        s = int(shifts[i])
        ref = torch.zeros(40)
        for j in range(40):
            if 0 <= j - s < 40:
                ref[j] = x[i, j - s]
        assert torch.equal(out[i], ref)
    assert torch.equal(t.train_batch(x[[4]], idx[[4]], 1, 2)[0], out[4])  # a function of (seed, epoch, index)
    assert torch.equal(VectorTransform().train_batch(x, idx, 1, 2), x)  # off by default
