import json
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.engine import checkpoint as ck
from kdlab.trust import set_trust

from conftest import CONFIGS, SMALL, run_kdlab

KD = CONFIGS / "mnist1d" / "student_kd.yaml"


@pytest.fixture(scope="module")
def _finished_run(tmp_path_factory, teacher_run):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["distill", KD, "--out", out, "--quiet", f"teacher.checkpoint={teacher_run}", *SMALL]) == 0
    return out


@pytest.fixture
def existing_run(tmp_path, _finished_run):
    """A finished distillation run (a fresh copy per test) whose files must survive every failed command."""
    import shutil

    return Path(shutil.copytree(_finished_run, tmp_path / "run", symlinks=True))


def _snapshot(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _teacher_file(tmp_path, arch="mnist1d_mlp", classes=10):
    """A real safetensors checkpoint of ``arch`` with ``classes`` outputs."""
    from kdlab.models import build

    path = tmp_path / f"{arch}_{classes}.safetensors"
    ck.save_weights(path, build(arch, num_classes=classes).state_dict())
    return path


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def _cifar(tmp_path, n_train=2, labels=(0, 1)):
    import numpy as np

    root = tmp_path / "cifar"
    root.mkdir(exist_ok=True)
    imgs = np.zeros((n_train, 32, 32, 3), np.uint8)
    np.savez(root / "train.npz", images=imgs, fine_labels=np.array(labels[:n_train], dtype=np.int16))
    np.savez(root / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), fine_labels=np.array([0, 1], np.int16))
    return root


def _images(tmp_path, fifo=False):
    """A two-class image folder of 4×4 PNGs (train/ and val/); with ``fifo`` a FIFO named like an image in it."""
    import os

    import numpy as np
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / split / c / "0.png")
    if fifo:
        os.mkfifo(root / "train" / "b" / "zzz.png")
    return root


_DEV_ZERO = object()


def _npz(tmp_path, images=None, labels=(0, 1), train=None):
    """A CIFAR train.npz/test.npz folder whose train.npz holds ``images`` / ``labels`` (or the raw bytes ``train``;
    ``b'labels only'``: an archive without images)."""
    import numpy as np

    root = tmp_path / "npz"
    root.mkdir(exist_ok=True)
    images = np.zeros((len(labels), 32, 32, 3), np.uint8) if images is None else images
    if train == b"labels only":
        np.savez(root / "train.npz", fine_labels=np.asarray(labels))
    elif train is _DEV_ZERO:
        (root / "train.npz").symlink_to("/dev/zero")
    elif train is not None:
        (root / "train.npz").write_bytes(train)
    else:
        np.savez(root / "train.npz", images=images, fine_labels=np.asarray(labels))
    np.savez(root / "test.npz", images=np.zeros((2, 32, 32, 3), np.uint8), fine_labels=np.array([0, 1], np.int16))
    return root


def _pickles(tmp_path, data=None, labels=None, train=None):
    """An official-layout cifar-100-python/ folder whose train pickle holds 'data'/'fine_labels' (or is ``train``)."""
    import pickle

    import numpy as np

    root = tmp_path / "cifar-100-python"
    root.mkdir(exist_ok=True)
    (root / "train").write_bytes(train if train is not None else pickle.dumps({b"data": data, b"fine_labels": labels}))
    (root / "test").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}))
    return root


def _fifo(tmp_path, name="fifo"):
    import os

    path = tmp_path / name
    os.mkfifo(path)
    return path


def _bad_teacher(tmp_path, how):
    """The MNIST-1D CNN teacher's weights, quantised to int8 or with a NaN."""
    import torch

    from kdlab.models import build

    state = build("mnist1d_cnn", num_classes=10).state_dict()
    key = next(k for k in state if k.endswith("weight"))
    if how == "int8":
        state[key] = state[key].to(torch.int8)
    else:
        state[key][0] = float(how)
    path = tmp_path / f"teacher_{how}.safetensors"
    ck.save_weights(path, state)
    return path


def _cache_file(tmp_path, damage=None, **meta):
    """A checksummed teacher-cache file whose metadata is ``meta`` over valid defaults; ``damage``: one byte of
    its logits or of its header changed afterwards, or ``"v1"``: the old format without checksums."""
    import torch
    from safetensors.torch import save_file

    from kdlab.engine.teacher_cache import FORMAT, CacheWriter

    info = dict(format=FORMAT, views=1, num_samples=800, num_classes=10, augment_seed=0, fields=["logits"],
                dataset="mnist1d")  # fmt: skip
    path = tmp_path / "cache.safetensors"
    if damage == "v1":
        info["format"] = "kdlab-teacher-cache-v1"
        save_file({"logits.0": torch.zeros(800, 10)}, str(path), metadata={"kdlab": json.dumps(dict(info, **meta))})
        return path
    writer = CacheWriter(path, dict(info, **meta))
    writer.start([("logits.0", torch.float32, (800, 10))])
    writer.write(torch.zeros(800, 10))
    writer.finish()
    if damage is not None:
        data = bytearray(path.read_bytes())
        data[-1 if damage == "logits" else data.index(b'"shape":[800') + 9] ^= 1  # a logit; the header's 800 -> 900
        path.write_bytes(bytes(data))
    return path


def _devzero(tmp_path, name):
    """``name`` as a symbolic link to /dev/zero (endless zeros: read whole, it fills the machine's memory)."""
    path = tmp_path / name
    path.symlink_to("/dev/zero")
    return path


USER_DATA = """
import torch
from torch.utils.data import Dataset

def _pair(bad):
    x, y = torch.linspace(-1, 1, 4000).reshape(100, 40), torch.arange(100) % 10
    if bad == "float labels":
        y = y + 0.5 * (torch.arange(100) == 13)  # train sample 13: 3.5
    if bad == "2-D labels":
        y = y[:, None]
    if bad == "label 10":
        y[85] = 10  # test sample 5
    if bad == "nan":
        x[7, 3] = float("nan")
    if bad == "inf in test":
        x[83, 0] = float("inf")  # test sample 3
    return {"train": (x[:80], y[:80]), "test": (x[80:], y[80:]), "num_classes": 10}

class Items(Dataset):
    def __init__(self, bad=None):
        self.bad = bad
    def __len__(self):
        return 20
    def __getitem__(self, i):
        x, y = torch.zeros(40), i % 10
        if i == 6 and self.bad == "shape":
            x = torch.zeros(41)
        if i == 6 and self.bad == "vector label":
            y = torch.tensor([1, 0])
        if i == 6 and self.bad == "float label":
            y = 2.5
        if i == 6 and self.bad == "inf":
            x[5] = float("inf")
        return x, y

def build(cfg):
    bad = cfg.root.rsplit("/", 1)[-1].replace("_", " ")
    if bad.startswith("streamed "):
        split, what = bad[len("streamed "):].split(" ", 1)
        return {"train": Items(what if split == "train" else None), "test": Items(what if split == "test" else None),
                "num_classes": 10}
    return _pair(bad)
"""


def _user_data(tmp_path, bad):
    """``data.name=…:build data.root=…/<bad>``: a user dataset builder (run with --trust-code) whose data is ``bad``."""
    path = tmp_path / "user_data.py"
    path.write_text(USER_DATA)
    return [f"data.name={path}:build", f"data.root={tmp_path / bad.replace(' ', '_')}", "data.workers=0", "--trust-code"]


def _downloaded_run(tmp_path):
    """A run folder whose config.yaml names a .py file shipped in it (``RUN/evil.py:Net``), with weights."""
    import torch

    run = tmp_path / "downloaded"
    run.mkdir()
    _file(run, "evil.py", "raise SystemExit('imported')")
    _file(run, "config.yaml", f"model: {{name: {run / 'evil.py'}:Net, classifier: fc}}\n")
    ck.save_weights(run / "model.safetensors", {"fc.weight": torch.zeros(10, 40)})
    return run


EVIL_PICKLE = b"cos\nsystem\n(S'true'\ntR."  # os.system('true') when unpickled naively
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


CE = CONFIGS / "mnist1d" / "student_ce.yaml"
RUN = "{run}"  # replaced by the existing run directory
T = "{teacher}"  # replaced by the teacher run directory

# (command and arguments, expected message); every case also passes --quiet and must leave the run untouched.
CASES = {
    "unknown model": (lambda t: ["distill", KD, "model.name=resnet9", "--out", RUN, "--overwrite"],
                      "unknown model 'resnet9' (did you mean 'resnet8'?)"),
    "unknown method": (lambda t: ["distill", KD, "method.name=dkdd", "--out", RUN, "--overwrite"], "unknown method 'dkdd'"),
    "unknown override key": (lambda t: ["distill", KD, "train.epoch=1", "--out", RUN, "--overwrite"],
                             "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    "unknown section": (lambda t: ["distill", KD, "trian.epochs=1", "--out", RUN], "unknown key 'trian'"),
    "param of another method": (lambda t: ["train", CE, "method.temperature=4", "--out", RUN],
                                "unknown key 'method.temperature'"),
    "malformed yaml": (lambda t: ["train", _file(t, "x.yaml", "model: {name: a\nmethod: ["), "--out", RUN],
                       "malformed YAML in"),
    "yaml not a mapping": (lambda t: ["train", _file(t, "l.yaml", "- 1\n"), "--out", RUN], "must be a YAML mapping"),
    "missing config file": (lambda t: ["train", t / "none.yaml", "--out", RUN], "config file not found"),
    "override without =": (lambda t: ["train", CE, "train.epochs", "--out", RUN], "must look like key.sub=value"),
    "stray argument": (lambda t: ["train", CE, "--out", RUN, "stray"], "unrecognized arguments: stray"),
    "wrong type": (lambda t: ["distill", KD, "train.batch_size=big", "--out", RUN], "train.batch_size: Input should be a valid integer"),
    "zero temperature": (lambda t: ["distill", KD, "method.temperature=0", "--out", RUN], "method.temperature: Input should be greater than 0"),
    "negative temperature": (lambda t: ["distill", KD, "method.temperature=-2", "--out", RUN], "greater than 0"),
    "negative loss weight": (lambda t: ["distill", KD, "method.kd_weight=-1", "--out", RUN], "method.kd_weight: Input should be greater than or equal to 0"),
    "all weights zero": (lambda t: ["distill", KD, "method.kd_weight=0", "method.ce_weight=0", "--out", RUN], "all loss weights are zero"),
    "zero epochs": (lambda t: ["train", CE, "train.epochs=0", "--out", RUN], "train.epochs: Input should be greater than 0"),
    "zero learning rate": (lambda t: ["train", CE, "optim.lr=0", "--out", RUN], "optim.lr: Input should be greater than 0"),
    "momentum out of range": (lambda t: ["train", CE, "optim.momentum=1.5", "--out", RUN], "optim.momentum: Input should be less than 1"),
    "bad split fraction": (lambda t: ["train", CE, "data.train_split=1.5", "--out", RUN], "data.train_split"),
    "unknown dataset": (lambda t: ["train", CE, "data.name=imagenett", "--out", RUN, "--overwrite"], "unknown dataset 'imagenett'"),
    "missing data root": (lambda t: ["distill", KD, "data.name=cifar100", f"data.root={t / 'nowhere'}", "--out", RUN, "--overwrite"],
                          "cifar100: data root not found"),
    "empty data": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_cifar(t, 0)}", "--out", RUN, "--overwrite"], "empty"),
    "labels out of range": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_cifar(t, 2, (0, 100))}", "--out", RUN, "--overwrite"],
                            "labels must lie in [0, 99], found [0, 100]"),
    "teacher of another architecture": (lambda t: ["distill", KD, f"teacher.checkpoint={_teacher_file(t)}", "--out", RUN, "--overwrite"],
                                        "does not fit architecture 'mnist1d_cnn'"),
    "teacher/data class mismatch": (lambda t: ["distill", KD, f"teacher.checkpoint={_teacher_file(t, 'mnist1d_cnn', 100)}", "--out", RUN, "--overwrite"],
                                    "'fc.weight' has shape [100, 128] in the checkpoint but [10, 128] in the model"),
    "teacher file missing": (lambda t: ["distill", KD, f"teacher.checkpoint={t / 'no.safetensors'}", "--out", RUN, "--overwrite"], "checkpoint not found"),
    "teacher file corrupted": (lambda t: ["distill", KD, f"teacher.checkpoint={_file(t, 'bad.safetensors', b'garbage' * 9)}", "--out", RUN, "--overwrite"],
                               "is not a valid safetensors file"),
    "teacher folder without weights": (lambda t: ["distill", KD, f"teacher.checkpoint={t}", "--out", RUN, "--overwrite"], "folder without model.safetensors"),
    "distill without teacher": (lambda t: ["distill", KD, "teacher=null", "--out", RUN, "--overwrite"], "needs a teacher"),
    "train with a teacher method": (lambda t: ["train", KD, f"teacher.checkpoint={T}", "--out", RUN], "needs a teacher; use `kdlab distill`"),
    "distill with ce": (lambda t: ["distill", CE, "--out", RUN], "does not use a teacher; use `kdlab train`"),
    "run exists": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "--out", RUN], "already holds a run; pass --resume"),
    "resume and overwrite": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "--out", RUN, "--resume", "--overwrite"],
                             "exclude each other"),
    "resume with another config": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "optim.lr=0.3", "--out", RUN, "--resume"],
                                   "--resume with a different config: 'optim.lr'"),
    "out is a file": (lambda t: ["train", CE, "--out", _file(t, "f.txt", "x")], "exists and is not a folder"),
    "device not available": (lambda t: ["train", CE, "train.device=cuda", "--out", RUN, "--overwrite"], "CUDA is not available"),
    # -- command line (issue 13 §6): argparse's errors are one line too
    "yacs habit key value": (lambda t: ["train", CE, "train.epochs", "3", "--out", RUN], "write train.epochs=3"),
    "yacs habit after options": (lambda t: ["train", CE, "--out", RUN, "train.epochs", "3"], "write train.epochs=3"),
    "missing --out": (lambda t: ["train", CE], "the following arguments are required: --out"),
    "unknown option": (lambda t: ["train", CE, "--out", RUN, "--epochs", "3"], "unrecognized arguments: --epochs"),
    "unknown command": (lambda t: ["trian", CE], "invalid choice: 'trian'"),
    "no command": (lambda t: [], "the following arguments are required: COMMAND"),
    "override with empty key": (lambda t: ["train", CE, "train..epochs=1", "--out", RUN], "has an empty key"),
    "override through a value": (lambda t: ["train", CE, "seed.x=1", "--out", RUN], "'seed' is not a section"),
    "out below a file": (lambda t: ["train", CE, "--out", _file(t, "f.txt", "x") / "run"], "f.txt/run: Not a directory"),
    "resume without a run": (lambda t: ["train", "--resume", "--out", t], "nothing to resume"),
    "config needed without resume": (lambda t: ["train", "--out", RUN], "a config file is required"),
    # -- config values
    "zero batch size": (lambda t: ["train", CE, "train.batch_size=0", "--out", RUN], "train.batch_size: Input should be greater than 0"),
    "negative seed": (lambda t: ["train", CE, "seed=-1", "--out", RUN], "seed: Input should be greater than or equal to 0"),
    "zero threads": (lambda t: ["train", CE, "train.threads=0", "--out", RUN], "train.threads: Input should be greater than 0"),
    "device name": (lambda t: ["train", CE, "train.device=gpu", "--out", RUN], "device must be auto, cpu, cuda or cuda:N"),
    "unknown amp": (lambda t: ["train", CE, "train.amp=fp8", "--out", RUN], "train.amp"),
    "milestones not increasing": (lambda t: ["train", CE, "schedule.milestones=[5,2]", "--out", RUN], "milestones must be positive and increasing"),
    "negative warm-up": (lambda t: ["train", CE, "schedule.warmup_epochs=-1", "--out", RUN], "schedule.warmup_epochs"),
    "label noise of 1": (lambda t: ["train", CE, "data.label_noise=1.0", "--out", RUN], "data.label_noise: Input should be less than 1"),
    "zero samples": (lambda t: ["train", CE, "data.num_samples=0", "--out", RUN], "data.num_samples: Input should be greater than 0"),
    "unknown instrument": (lambda t: ["train", CE, "instruments=[nope]", "--out", RUN], "unknown"),
    "sync_bn not a bool": (lambda t: ["train", CE, "train.sync_bn=maybe", "--out", RUN], "train.sync_bn"),
    # -- config files (§7, §8)
    "yaml alias bomb": (lambda t: ["train", _file(t, "bomb.yaml", BOMB), "--out", RUN], "expands to more than 100000 nodes"),
    "recursive yaml alias": (lambda t: ["train", _file(t, "rec.yaml", "a: &a [*a]\n"), "--out", RUN], "refers to its own anchor"),
    "config is a folder": (lambda t: ["train", t, "--out", RUN], "is a folder, not a regular file"),
    "config is a FIFO": (lambda t: ["train", _fifo(t), "--out", RUN], "is a FIFO (named pipe), not a regular file"),
    "config not UTF-8": (lambda t: ["train", _file(t, "bin.yaml", b"\xff\xfe\x00model"), "--out", RUN], "is not UTF-8 text"),
    "base recipe loops": (lambda t: ["train", _file(t, "loop.yaml", "base: loop.yaml\n"), "--out", RUN], "'base' chain loops back"),
    "unset variable in a path": (lambda t: ["train", CE, "data.name=cifar100", "data.root=${KDLAB_TEST_UNSET}/c", "--out", RUN],
                                 "data.root: environment variable KDLAB_TEST_UNSET is not set"),
    "unset variable in teacher path": (lambda t: ["distill", KD, "teacher.checkpoint=$KDLAB_TEST_UNSET/t.safetensors", "--out", RUN],
                                       "environment variable KDLAB_TEST_UNSET is not set"),
    # -- data (§7): one line naming the file, before training
    "too few samples": (lambda t: ["train", CE, "data.num_samples=5", "--out", RUN, "--overwrite"], "needs data.num_samples >= 20"),
    "one training sample": (lambda t: ["train", CE, "data.num_samples=20", "data.train_split=0.05", "--out", RUN, "--overwrite"],
                            "has too few samples (1 train"),
    "float images in npz": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, __import__('numpy').zeros((2, 32, 32, 3), 'float32'))}",
                                       "--out", RUN, "--overwrite"], "train.npz: 'images' must be uint8 values 0..255, found float32"),
    "NaN labels in npz": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, labels=(0.0, float('nan')))}", "--out", RUN, "--overwrite"],
                          "train.npz: labels contain NaN"),
    "fractional labels": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, labels=(0.5, 1.0))}", "--out", RUN, "--overwrite"],
                          "labels must be whole numbers"),
    "text labels in npz": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, labels=('a', 'b'))}", "--out", RUN, "--overwrite"],
                           "train.npz: 'labels' must be numeric"),
    "more labels than images": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, __import__('numpy').zeros((2, 32, 32, 3), 'uint8'), (0, 1, 2))}",
                                           "--out", RUN, "--overwrite"], "train.npz: 2 images but 3 labels"),
    "2-D labels": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, __import__('numpy').zeros((2, 32, 32, 3), 'uint8'), [[0], [1]])}",
                               "--out", RUN, "--overwrite"], "labels must be a 1-D array"),
    "images of another size": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, __import__('numpy').zeros((2, 28, 28), 'uint8'))}",
                                          "--out", RUN, "--overwrite"], "'images' must be uint8 N×32×32×3"),
    "npz without images": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, train=b'labels only')}", "--out", RUN, "--overwrite"],
                           "no 'images' array"),
    "npz not an archive": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, train=b'not a zip')}", "--out", RUN, "--overwrite"],
                           "train.npz: unreadable .npz"),
    "ragged pickle images": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_pickles(t, [[0] * 3072, [0] * 5], [0, 1])}", "--out", RUN, "--overwrite"],
                             "train: 'data' is not a rectangular array"),
    "float pickle images": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_pickles(t, __import__('numpy').full((2, 3072), 0.5), [0, 1])}",
                                       "--out", RUN, "--overwrite"], "train: 'data' must be uint8 values 0..255, found float64"),
    "pickle labels not numbers": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_pickles(t, __import__('numpy').zeros((2, 3072), 'uint8'), ['x', None])}",
                                             "--out", RUN, "--overwrite"], "cifar-100-python/train: 'labels' must be numeric"),
    "pickle images out of range": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_pickles(t, [[300] * 3072, [0] * 3072], [0, 1])}",
                                              "--out", RUN, "--overwrite"], "'data' must be uint8 values 0..255, found int64"),
    "pickle that runs code": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_pickles(t, train=EVIL_PICKLE)}",
                                         "--out", RUN, "--overwrite"], "train: refused to unpickle 'os.system'"),
    "data root is a FIFO": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_fifo(t)}", "--out", RUN, "--overwrite"],
                            "cifar100: data root"),
    "import a folder": (lambda t: ["import-checkpoint", t, "--arch", "resnet8", "--out", t / "x.safetensors"], "is a folder, not a regular file"),
    "archive not a tar": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_file(t, 'c.tar.gz', b'garbage')}", "--out", RUN, "--overwrite"],
                          "not a readable tar archive"),
    "image data for a 1-D model": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_cifar(t)}", "--out", RUN, "--overwrite"],
                                   "model 'mnist1d_mlp' does not accept the inputs of dataset 'cifar100'"),
    "1-D data for an image model": (lambda t: ["train", CE, "model.name=resnet8", "--out", RUN, "--overwrite"],
                                    "model 'resnet8' does not accept the inputs of dataset 'mnist1d' (one sample: shape [40]"),
    # -- teacher weights and caches (§7, §8)
    "int8 teacher weights": (lambda t: ["distill", KD, f"teacher.checkpoint={_bad_teacher(t, 'int8')}", "--out", RUN, "--overwrite"],
                             "is int8, not floating point"),
    "NaN teacher weights": (lambda t: ["distill", KD, f"teacher.checkpoint={_bad_teacher(t, 'nan')}", "--out", RUN, "--overwrite"],
                            "holds NaN or infinite values"),
    "Inf teacher weights": (lambda t: ["distill", KD, f"teacher.checkpoint={_bad_teacher(t, 'inf')}", "--out", RUN, "--overwrite"],
                            "holds NaN or infinite values"),
    "teacher checkpoint is a FIFO": (lambda t: ["distill", KD, f"teacher.checkpoint={_fifo(t)}", "--out", RUN, "--overwrite"],
                                     "is a FIFO (named pipe), not a regular file"),
    "ensemble member missing": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", "method.name=kd",
                                           f"teacher.ensemble=[{{name: mnist1d_cnn, checkpoint: {t / 'gone.safetensors'}}}]", "--out", RUN, "--overwrite"],
                                "checkpoint not found"),
    "teacher cache missing": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={t / 'none.safetensors'}", "--out", RUN, "--overwrite"],
                              "teacher cache not found"),
    "teacher cache is a folder": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={t}", "--out", RUN, "--overwrite"],
                                  "teacher cache"),
    "teacher cache with 0 views": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_cache_file(t, views=0)}", "--out", RUN, "--overwrite"],
                                   "damaged teacher cache metadata (views=0)"),
    "teacher cache not a cache": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_file(t, 'c.safetensors', b'x' * 20)}",
                                             "--out", RUN, "--overwrite"], "is not a usable kdlab teacher cache"),
    # -- other commands: bad paths and bad numbers (§8)
    "eval missing weights": (lambda t: ["eval", t / "none.safetensors"], "checkpoint not found"),
    "eval a FIFO": (lambda t: ["eval", _fifo(t)], "is a FIFO (named pipe), not a regular file"),
    "eval a bad split": (lambda t: ["eval", RUN, "--split", "dev"], "invalid choice: 'dev'"),
    "eval --split val without a val split": (lambda t: ["eval", RUN, "--split", "val"], "holds out no val split"),
    "analyze a non-run": (lambda t: ["analyze", t], "is not a kdlab run directory"),
    "analyze zero samples": (lambda t: ["analyze", RUN, "--max-samples", "0"], "--max-samples: must be a positive integer, got 0"),
    "analyze negative t-SNE": (lambda t: ["analyze", RUN, "--tsne-samples", "-1"], "--tsne-samples: must be an integer >= 0, got -1"),
    "report a missing run": (lambda t: ["report", t / "none"], "no such run or folder"),
    "compare a missing run": (lambda t: ["compare", t / "none"], "no such run or folder"),
    "sweep zero jobs": (lambda t: ["sweep", CE, "--out", t / "s", "--jobs", "0"], "--jobs: must be a positive integer, got 0"),
    "sweep zero threads": (lambda t: ["sweep", CE, "--out", t / "s", "--jobs", "2", "--threads", "0"], "--threads: must be a positive integer, got 0"),
    "cache zero views": (lambda t: ["cache-teacher", KD, "--views", "0", "--out", t / "c.safetensors"], "--views: must be a positive integer, got 0"),
    "cache out is a folder": (lambda t: ["cache-teacher", KD, f"teacher.checkpoint={T}", "--views", "1", "--out", t], "is a folder; give a file name"),
    "cache out below a file": (lambda t: ["cache-teacher", KD, f"teacher.checkpoint={T}", "--views", "1", "--out", _file(t, "f", "x") / "c.safetensors"],
                               "is not a folder"),
    "import negative classes": (lambda t: ["import-checkpoint", t / "x.pth", "--arch", "resnet8", "--out", t / "x.safetensors", "--num-classes", "-3"],
                                "--num-classes: must be a positive integer, got -3"),
    "bench zero batch": (lambda t: ["bench", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    "bench negative workers": (lambda t: ["bench", "--workers", "-1"], "--workers: must be an integer >= 0, got -1"),
    "demo zero seeds": (lambda t: ["demo", "--seeds", "0", "--out", t / "d"], "--seeds: must be a positive integer, got 0"),
    "demo word for a number": (lambda t: ["demo", "--teacher-epochs", "ten", "--out", t / "d"], "must be a positive integer, got 'ten'"),
    "keys of an unknown group": (lambda t: ["keys", "extra"], "unknown key group 'extra'"),
    # -- round three: code trust and user datasets (issue 19 §1, §4)
    "data.name .py builder without --trust-code": (lambda t: ["train", CE, _user_data(t, "none")[0], "--out", RUN, "--overwrite"],
                                                   "names code in a Python file; kdlab imports it only with --trust-code"),
    "model.name .py nn.Module without --trust-code": (lambda t: ["train", CE, f"model.name={_file(t, 'net.py', 'x = 1')}:Net", "model.classifier=fc",
                                                                 "--out", RUN, "--overwrite"], "model.name '"),
    "eval: a run folder's config names its own .py": (lambda t: ["eval", _downloaded_run(t)], "model.name '"),
    "user data: float labels": (lambda t: ["train", CE, *_user_data(t, "float labels"), "--out", RUN, "--overwrite"],
                                "train split sample 13: label 3.5 is not an integer class index (kdlab does not round labels)"),
    "user data: 2-D labels": (lambda t: ["train", CE, *_user_data(t, "2-D labels"), "--out", RUN, "--overwrite"],
                              "train split: labels must be 1-D (one class index per sample), got shape (80, 1)"),
    "user data: label = num_classes": (lambda t: ["train", CE, *_user_data(t, "label 10"), "--out", RUN, "--overwrite"],
                                       "test split sample 5: label 10 is outside [0, 10)"),
    "user data: NaN input": (lambda t: ["train", CE, *_user_data(t, "nan"), "--out", RUN, "--overwrite"],
                             "train split sample 7: input is not finite (nan)"),
    "user data: inf in the test split": (lambda t: ["train", CE, *_user_data(t, "inf in test"), "--out", RUN, "--overwrite"],
                                         "test split sample 3: input is not finite (inf)"),
    "user Dataset: items of two shapes": (lambda t: ["train", CE, *_user_data(t, "streamed train shape"), "--out", t / "o"],
                                          "train split sample 6: input shape (41,) differs from (40,)"),
    "user Dataset: a vector label": (lambda t: ["train", CE, *_user_data(t, "streamed train vector label"), "--out", t / "o"],
                                     "train split sample 6: label has shape (2,), expected a single class index"),
    "user Dataset: float label": (lambda t: ["train", CE, *_user_data(t, "streamed train float label"), "--out", t / "o"],
                                  "train split sample 6: label 2.5 is not an integer class index"),
    "user Dataset: inf in the test split": (lambda t: ["train", CE, *_user_data(t, "streamed test inf"), "--out", t / "o"],
                                            "test split sample 6: input is not finite (inf)"),
    # -- round three: bounded reads, teacher-cache checksums, outputs checked first (issue 19 §2, §7, §8)
    "config is /dev/zero": (lambda t: ["train", _devzero(t, "c.yaml"), "--out", RUN], "c.yaml is a device, not a regular file"),
    "recipe base is /dev/zero": (lambda t: ["train", _file(t, "child.yaml", f"base: {_devzero(t, 'zero.yaml').name}\n"), "--out", RUN],
                                 "zero.yaml is a device, not a regular file"),
    "teacher checkpoint is /dev/zero": (lambda t: ["distill", KD, f"teacher.checkpoint={_devzero(t, 'w.safetensors')}", "--out", RUN, "--overwrite"],
                                        "w.safetensors is a device, not a regular file"),
    "teacher cache is /dev/zero": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_devzero(t, 'c.safetensors')}", "--out", RUN,
                                              "--overwrite"], "c.safetensors is a device, not a regular file"),
    "teacher cache: one logit byte changed": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_cache_file(t, 'logits')}", "--out", t / "o"],
                                              "cache.safetensors is damaged: bytes 0-32000 of tensor 'logits.0' do not match their recorded SHA-256"),
    "teacher cache: one header byte changed": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_cache_file(t, 'header')}", "--out", RUN,
                                                          "--overwrite"], "cache.safetensors is damaged: its header does not match its recorded SHA-256"),
    "teacher cache without checksums": (lambda t: ["distill", KD, f"teacher.checkpoint={T}", f"teacher.cache={_cache_file(t, 'v1')}", "--out", RUN, "--overwrite"],
                                        "was made by an older kdlab without checksums; rebuild it with kdlab cache-teacher"),
    "import a .pth that is /dev/zero": (lambda t: ["import-checkpoint", _devzero(t, "w.pth"), "--arch", "resnet8", "--out", t / "x.safetensors"],
                                        "w.pth is a device, not a regular file"),
    "eval /dev/zero weights": (lambda t: ["eval", _devzero(t, "w.safetensors")], "w.safetensors is a device, not a regular file"),
    "cifar train.npz is /dev/zero": (lambda t: ["train", CE, "data.name=cifar100", f"data.root={_npz(t, train=_DEV_ZERO)}", "--out", RUN, "--overwrite"],
                                     "train.npz is a device, not a regular file"),
    "bench --json a folder": (lambda t: ["bench", "--json", t], "is a folder; give a file name"),
    "bench --json below a file": (lambda t: ["bench", "--json", _file(t, "f", "x") / "b.json"], "f is not a folder"),
    "report --out below a file": (lambda t: ["report", RUN, "--out", _file(t, "f", "x") / "r.html"], "f is not a folder"),
    "compare --csv a folder": (lambda t: ["compare", RUN, "--csv", t], "is a folder; give a file name"),
    "export-images into a full folder": (lambda t: ["export-images", t, "--out", RUN], "already exists and is not an empty folder"),
    # -- round three: release fidelity (issue 22)
    "teacher cache for a teacher on batch statistics (wsld)": (lambda t: ["distill", KD, "method.name=wsld", f"teacher.checkpoint={T}",
                                                                          f"teacher.cache={t / 'c.safetensors'}", "--out", t / "o"],
                                                               "which a teacher cache cannot replay; unset teacher.cache, or set method.teacher_bn=eval"),
    "cache-teacher for a recipe whose teacher runs on batch statistics": (lambda t: ["cache-teacher", KD, "method.name=wsld", "--views", "1",
                                                                                     "--out", t / "c.safetensors"], "method 'wsld' runs the teacher's BatchNorms"),
    "wsld: teacher_bn neither train nor eval": (lambda t: ["distill", KD, "method.name=wsld", "method.teacher_bn=batch", "--out", RUN],
                                                "method.teacher_bn: Input should be 'train' or 'eval'"),
    # -- round three: kdlab tune (issue 20 §5)
    "tune: --space without KIND(ARGS)": (lambda t: ["tune", CE, "--space", "optim.lr=0.1", "--trials", "2", "--out", t / "s"],
                                         "--space 'optim.lr=0.1' must look like key.sub=KIND(ARGS)"),
    "tune: unknown space kind": (lambda t: ["tune", CE, "--space", "optim.lr=normal(0,1)", "--trials", "2", "--out", t / "s"],
                                 "unknown kind 'normal'"),
    "tune: log range from 0": (lambda t: ["tune", CE, "--space", "optim.lr=log(0,1)", "--trials", "2", "--out", t / "s"],
                               "log() needs low > 0 (a log scale), got 0"),
    "tune: searched key the method lacks": (lambda t: ["tune", CE, "--space", "method.temperature=log(1,16)", "--trials", "2", "--out", t / "s"],
                                            "unknown key 'method.temperature'"),
    "tune: zero trials": (lambda t: ["tune", CE, "--space", "optim.lr=log(0.01,1)", "--trials", "0", "--out", t / "s"],
                          "--trials: must be a positive integer, got 0"),
    "tune: --out is a run folder": (lambda t: ["tune", CE, "--space", "optim.lr=log(0.01,1)", "--trials", "2", "--out", RUN],
                                    "is not empty and holds no kdlab tune study"),
    # -- round three: Slurm launcher (issue 20)
    "--launcher slurm with --jobs": (lambda t: ["sweep", CE, "--launcher", "slurm", "--jobs", "2", "--out", t / "o"],
                                     "--jobs runs local worker processes; with --launcher slurm every run is a job"),
    "unknown launcher": (lambda t: ["train", CE, "--launcher", "slrum", "--out", t / "o"], "unknown launcher 'slrum' (did you mean 'slurm'?)"),
    "malformed launcher.time": (lambda t: ["train", CE, "launcher.time=4h", "--out", t / "o"],
                                "launcher.time: time must be minutes or a Slurm time such as 4:00:00"),
    "--status of a folder that is no plan": (lambda t: ["sweep", "--status", t], "is neither a plan folder (plan.json) nor a kdlab run"),
    "--status with a recipe": (lambda t: ["sweep", CE, "--status", t], "--status takes only the folder"),
    # -- round three: image data (issue 19 §3, issue 21)
    "image folder: a FIFO named like an image": (lambda t: ["train", CE, "data.name=imagefolder", f"data.root={_images(t, fifo=True)}",
                                                            "--out", RUN, "--overwrite"], "zzz.png is a FIFO (named pipe), not a regular file"),
    "webdataset: no export at data.root": (lambda t: ["train", CE, "data.name=webdataset", f"data.root={t}", "--out", RUN, "--overwrite"],
                                           "WebDataset metadata not found"),
    "webdataset: an empty shard list": (lambda t: ["train", CE, "data.name=webdataset", "data.urls={train: [], val: [v.tar]}",
                                                   "--out", RUN, "--overwrite"], "data.urls lists no train shards"),
    "webdataset: pipe: shards without --trust-code": (lambda t: ["train", CE, "data.name=webdataset", "data.urls={train: 'pipe:cat a.tar', "
                                                                 "val: 'pipe:cat b.tar'}", "--out", RUN, "--overwrite"],
                                                      "data.urls runs shell commands ('pipe:cat a.tar')"),
    "export-images: zero shard size": (lambda t: ["export-images", _cifar(t), "--out", t / "s", "--format", "webdataset",
                                                  "--shard-size", "0"], "--shard-size must be at least 1"),
    "export-images: an image folder as PNGs": (lambda t: ["export-images", _images(t), "--out", t / "s"],
                                               "is an image folder already; --format webdataset writes it as shards"),
    "bench --suite data: --root not an image folder": (lambda t: ["bench", "--suite", "data", "--root", t, "--json", t / "b.json"],
                                                       "is not an image folder"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_exit_2_and_nothing_touched(case, tmp_path, existing_run, teacher_run, capsys):
    if case == "device not available" and __import__("torch").cuda.is_available():
        pytest.skip("CUDA is available here")
    args = [str(a).replace(RUN, str(existing_run)).replace(T, str(teacher_run)) for a in CASES[case][0](tmp_path)]
    if args[:1] in (["train"], ["distill"]) and args[1:2] == [str(KD)] and "teacher" not in " ".join(args[2:]):
        args.append(f"teacher.checkpoint={teacher_run}")
    if args[:1] in (["train"], ["distill"]) and args[1:2] != ["--resume"]:
        args = [*args[:2], *SMALL, *args[2:], "--quiet"]  # the case's own overrides win
    before = _snapshot(existing_run)
    capsys.readouterr()
    try:
        code = main(args)
    finally:
        set_trust(None)  # a case's --trust-code holds for that case only
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kdlab: error: "), err
    assert CASES[case][1] in err[0], err
    assert _snapshot(existing_run) == before


def test_at_least_70_bad_input_cases():
    assert len(CASES) >= 70


def test_disk_full_on_checkpoint_write(existing_run, teacher_run, monkeypatch, capsys):
    """ENOSPC while resuming: one line, exit 2, every existing file intact, no temporary files left behind."""
    import errno
    import os

    before = _snapshot(existing_run)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["distill", "--resume", "--out", existing_run, "train.epochs=3", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("kdlab: error: could not write") and "No space left on device" in err
    monkeypatch.undo()
    assert _snapshot(existing_run) == before
    # and the run can be resumed once there is space again
    assert main(["distill", "--resume", "--out", existing_run, "train.epochs=3", "--quiet"]) == 0


def test_existing_run_needs_resume_or_overwrite(existing_run, teacher_run, capsys):
    before = _snapshot(existing_run)
    code = main(["distill", KD, "--out", existing_run, "--quiet", f"teacher.checkpoint={teacher_run}", *SMALL])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert _snapshot(existing_run) == before


def test_console_script_error_path_and_help():
    res = run_kdlab("train", CONFIGS / "mnist1d" / "student_ce.yaml", "--out", "/tmp/never", "model.name=nope")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "unknown model 'nope'" in res.stderr
    res = run_kdlab("train", "--help")
    assert res.returncode == 0 and "method.temperature" in res.stdout and "schedule.milestones" in res.stdout


def test_train_distill_eval_end_to_end(tmp_path, teacher_run, capsys):
    out = tmp_path / "mse"
    assert main(["distill", CONFIGS / "mnist1d" / "student_mse.yaml", "--out", out, "--quiet",
                 f"teacher.checkpoint={teacher_run}", *SMALL]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "mse" and summary["teacher"] == "mnist1d_cnn" and summary["teacher_test_acc"] > 50
    assert main(["eval", out, "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["acc"] == pytest.approx(summary["final_test_acc"]) and ev["n"] == 200
    assert main(["eval", teacher_run / "model.safetensors", "--config", teacher_run / "config.yaml"]) == 0
    assert "mnist1d_cnn test accuracy" in capsys.readouterr().out


def test_dry_run_writes_nothing(tmp_path, teacher_run, capsys):
    out = tmp_path / "dry"
    assert main(["distill", KD, "--out", out, "--dry-run", f"teacher.checkpoint={teacher_run}", *SMALL]) == 0
    assert "dry run ok" in capsys.readouterr().out and not out.exists()


def test_resume_from_run_config_alone(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", CONFIGS / "mnist1d" / "student_ce.yaml", "--out", out, *SMALL, "train.epochs=1"]) == 0
    assert main(["train", "--resume", "--out", out, "train.epochs=2", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["epochs"] == 2


def test_demo_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", out, "--seeds", "2", "--teacher-epochs", "2", "--student-epochs", "2"]) == 0
    text = capsys.readouterr().out
    assert "| method | test accuracy (%) | seeds |" in text and "KD (T=4)" in text and "MSE" in text
    assert (out / "results.md").is_file() and (out / "results.png").stat().st_size > 5000
    assert len(list((out / "students").iterdir())) == 6
    env = json.loads((out / "students" / "student_kd_seed0" / "summary.json").read_text())["environment"]
    assert env["torch"]["threads"] >= 1 and env["packages"]["numpy"] and env["cpu"]["model"]  # kdlab.environment
    md = (out / "results.md").read_text()
    assert "Environment (" in md and f"torch {env['torch']['version']}: CPU kernels {env['torch']['cpu_capability']}" in md
    # re-running reuses the finished runs (fast, same table)
    assert main(["demo", "--out", out, "--seeds", "2", "--teacher-epochs", "2", "--student-epochs", "2"]) == 0
    assert (out / "results.md").read_text().strip() in capsys.readouterr().out
