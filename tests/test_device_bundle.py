"""benchmarks/device: which wheels travel (resolve), the CIFAR-100 slice round trip, what the call moves, the torch API
audit, and the CPU rehearsal of the whole bundle in a fresh environment (prepare here, run.sh there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "device"))
import bundle  # noqa: E402
import cifar_slice  # noqa: E402
import torch_api_audit  # noqa: E402

ENV = bundle.marker_env("3.12.3")


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                   + [f"Requires-Dist: {r}\n" for r in requires])  # fmt: skip
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


class FakeIndex:
    """``fetch(specs)`` over a dict index ``{name: {version: requires}}``: the newest version each spec admits."""

    def __init__(self, folder: Path, index: dict[str, dict[str, list[str]]]) -> None:
        self.folder, self.index, self.calls = folder, index, []

    def __call__(self, specs: list[str]) -> list[Path]:
        self.calls.append(specs)
        out = []
        for spec in specs:
            req = Requirement(spec)
            versions = sorted(self.index[bundle.canon(req.name)], key=bundle.Version)
            v = [x for x in versions if req.specifier.contains(x)][-1]
            out.append(_wheel(self.folder, bundle.canon(req.name), v, self.index[bundle.canon(req.name)][v]))
        return out


def test_resolve_carries_what_the_image_lacks_and_the_needs_it_cannot_prove(tmp_path):
    index = FakeIndex(tmp_path, {
        "pkga": {"2.0": ["pkgc>=1", "old-te>=4.16", "imgpkg", "winonly; sys_platform == 'win32'",
                         "extraonly; extra == 'x'"], "2.5": ["never"]},
        "pkgb": {"1.0": ["pkga<2.5", "pkgc>=1.5"]},
        "pkgc": {"1.0": [], "1.5": [], "1.7": []},
        "old-te": {"4.16.0": []},
    })  # fmt: skip
    image = {"imgpkg": "3.1", "old-te": None, "bigimg": None}
    reqs = [Requirement(r) for r in ("imgpkg>=3", "bigimg>=1.0", "pkga>=2", "pkgb")]
    plan = bundle.resolve(reqs, image, ENV, index, pins={"pkga": "2.0", "pkgc": "1.5"})
    assert list(plan.wheels) == ["pkga", "pkgb", "pkgc", "old-te"]
    assert {n: w.version for n, w in plan.wheels.items()} == {"pkga": "2.0", "pkgb": "1.0", "pkgc": "1.5",
                                                              "old-te": "4.16.0"}  # fmt: skip
    # one pip call per level; a level's requirers of one name are merged (pkgc>=1 and pkgc>=1.5 -> the pin 1.5)
    assert index.calls == [["pkga==2.0", "pkgb"], ["pkgc==1.5", "old-te>=4.16"]]
    met = dict(plan.met)
    assert met["imgpkg>=3"] == "image (3.1)" and met["bigimg>=1.0"] == "image (version checked on the device)"
    assert met["imgpkg"] == "image (3.1)" and list(plan.from_image) == ["imgpkg", "bigimg"]
    assert not any("never" in r or "winonly" in r or "extraonly" in r for r, _ in plan.met)


@pytest.mark.parametrize("reqs, image, match", [
    (["pkga", "pkgb"], {}, "pkga 2.0 travels, but pkga>=3 is needed too"),
    (["imgpkg>=4"], {"imgpkg": "3.1"}, "kdlab needs imgpkg>=4, the image has imgpkg 3.1"),
])  # fmt: skip
def test_resolve_refuses_what_no_single_version_meets(tmp_path, reqs, image, match):
    index = FakeIndex(tmp_path, {"pkga": {"2.0": []}, "pkgb": {"1.0": ["pkga>=3"]}})
    with pytest.raises(bundle.BundleError, match=match):
        bundle.resolve([Requirement(r) for r in reqs], image, ENV, index)


def test_image_list_holds_the_device_python_stack_and_kdlab_reads_its_pyproject():
    image = bundle.read_image_packages()
    assert image["torch"] == "2.11.0" and image["numpy"] == "2.5.2" and image["pyyaml"] is None
    assert "pydantic" not in image and "mnist1d" not in image and "pip" in image and "packaging" in image
    names = {bundle.canon(r.name) for r in bundle.kdlab_requirements()}
    assert {"torch", "pydantic", "mnist1d", "numpy"} <= names
    assert bundle.platforms((2, 28))[:2] == ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64"]
    assert bundle.platforms((2, 28))[-3:] == ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]


def _cifar_folder(folder: Path, train: int, test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        x[:, :16] //= 4  # some structure for the encoder
        y = rng.integers(0, 100, n).astype(np.int16)
        np.savez(folder / f"{split}.npz", images=x, fine_labels=y, coarse_labels=y // 5)
        out[split] = (x, y)
    return out


def test_cifar_slice_round_trip_is_exact_and_checked(tmp_path):
    src = _cifar_folder(tmp_path / "src", 260, 130)
    cifar_slice.write(tmp_path / "src", tmp_path / "slice", 250, 101)  # partial mosaic rows
    assert cifar_slice.decode(tmp_path / "slice", tmp_path / "out") == {"train": 250, "test": 101}
    for split, n in (("train", 250), ("test", 101)):
        with np.load(tmp_path / "out" / f"{split}.npz") as z:
            assert np.array_equal(z["images"], src[split][0][:n]) and np.array_equal(z["fine_labels"], src[split][1][:n])
    from kdlab.data.cifar import CIFAR100, read_cifar

    (x, y), (xt, _) = read_cifar(tmp_path / "out", CIFAR100)
    assert x.shape == (250, 3, 32, 32) and xt.shape == (101, 3, 32, 32) and int(y[3]) == int(src["train"][1][3])
    from PIL import Image

    mosaic = tmp_path / "slice" / "train-0.webp"
    with Image.open(mosaic) as im:
        pixels = np.asarray(im.convert("RGB")).copy()
    pixels[5, 7, 0] ^= 1
    Image.fromarray(pixels).save(mosaic, "WEBP", lossless=True)
    with pytest.raises(cifar_slice.SliceError, match="train images do not decode to the manifest's SHA-256"):
        cifar_slice.decode(tmp_path / "slice", tmp_path / "out2")
    with pytest.raises(cifar_slice.SliceError, match="asked for 300 images"):
        cifar_slice.write(tmp_path / "src", tmp_path / "slice", 300, 10)


def test_travelling_bytes_counts_tracked_untracked_and_carried_files_not_ignored_ones(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("/.whl/\nbig.bin\n")
    (tmp_path / "tracked.txt").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.txt", ".gitignore"], check=True)
    (tmp_path / "new.txt").write_bytes(b"y" * 300)
    (tmp_path / "big.bin").write_bytes(b"z" * 10**6)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "a.whl").write_bytes(b"w" * 5000)
    base = 1000 + 300 + len("/.whl/\nbig.bin\n")
    assert bundle.travelling_bytes(tmp_path, []) == base
    assert bundle.travelling_bytes(tmp_path, [tmp_path / ".whl"]) == base + 5000


def test_torch_api_audit_finds_what_a_release_lacks(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.nn import functional as F\n"
        "def f(x, m):\n"
        "    y = F.cross_entropy(x, x, label_smoothing=0.1)\n"
        "    s = torch.amp.GradScaler('cuda')\n"
        "    m.register_load_state_dict_pre_hook(None)\n"
        "    return nn.Linear(2, 2), torch.compile(m, dynamic=False), x.flip(0)\n"
    )
    paths, attrs = torch_api_audit.used_apis(src)
    assert paths == {"torch.nn.functional.cross_entropy": {"label_smoothing"}, "torch.amp.GradScaler": set(),
                     "torch.nn.Linear": set(), "torch.compile": {"dynamic"}}  # fmt: skip
    assert {"register_load_state_dict_pre_hook", "flip"} <= attrs
    new = torch_api_audit.Release({
        "torch/__init__.py": "from torch.nn import *\ndef compile(model, *, dynamic=None, mode=None): ...\n",
        "torch/amp/__init__.py": "from .grad_scaler import GradScaler\n",
        "torch/nn/__init__.py": "from .modules import *\n",
        "torch/nn/modules/__init__.py": "from .linear import (\n    Identity,\n    Linear,\n)\n",
        "torch/nn/modules/module.py": "class Module:\n    def register_load_state_dict_pre_hook(self, hook): ...\n",
        "torch/nn/functional.py": "def cross_entropy(input, target, weight=None, label_smoothing=0.0): ...\n",
        "torch/_tensor.py": "class Tensor:\n    def flip(self, dims): ...\n",
    }, "new")  # fmt: skip
    old = torch_api_audit.Release({
        "torch/__init__.py": "def compile(model, *, mode=None): ...\n",
        "torch/nn/__init__.py": "from .modules import *\n",
        "torch/nn/modules/__init__.py": "from .linear import Linear\n",
        "torch/nn/modules/module.py": "class Module:\n    def _register_load_state_dict_pre_hook(self, hook): ...\n",
        "torch/nn/functional.py": "def cross_entropy(\n    input,\n    target,\n    reduction='mean',\n): ...\n",
        "torch/_tensor.py": "class Tensor:\n    def flip(self, dims): ...\n",
    }, "old")  # fmt: skip
    methods = {"register_load_state_dict_pre_hook", "flip"}
    assert torch_api_audit.audit(paths, methods, new) == []
    assert torch_api_audit.audit(paths, methods, old) == [
        "torch.amp.GradScaler", "torch.compile(dynamic=)", "torch.nn.functional.cross_entropy(label_smoothing=)",
        ".register_load_state_dict_pre_hook"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The CPU rehearsal: the bundle is complete when run.sh passes in an environment holding only torch, the image's
# packages the bundle relies on, and the prepared wheels (kdlab itself only on PYTHONPATH, as on the device).


def _pip(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_NO_CACHE_DIR": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, **kw)


def _registry_reachable(tmp: Path) -> str | None:
    """None when pip can download from the package registry (mnist1d, which only the registry has); else why not."""
    proc = _pip("download", "--no-deps", "--only-binary=:all:", "-d", str(tmp), "mnist1d", timeout=120)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]


@pytest.mark.slow
def test_cpu_rehearsal_of_the_device_bundle_in_a_fresh_environment(tmp_path):
    t0 = time.perf_counter()
    why = _registry_reachable(tmp_path / "probe")
    if why is not None:
        pytest.skip(f"the package registry is unreachable ({why}); the rehearsal downloads wheels")
    import torch

    whl, slc, venv, out = tmp_path / "whl", tmp_path / "slice", tmp_path / "venv", tmp_path / "out"
    _cifar_folder(tmp_path / "cifar", 400, 200)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # what the image holds that the bundle relies on, torch as here; installed while prepare downloads the wheels
    image = ["pip", "packaging", "numpy", "safetensors", "PyYAML", "tqdm", "matplotlib", "scikit-learn", "tensorboard",
             "pillow", "requests", "scipy", "typing-extensions", f"torch=={torch.__version__.split('+')[0]}"]  # fmt: skip
    with ThreadPoolExecutor(1) as pool:
        install = pool.submit(_pip, "--python", str(py), "install", "-q", "--no-compile", *image, timeout=900)
        prep = subprocess.run(
            ["bash", str(REPO / "benchmarks" / "device" / "prepare.sh"), "--local", "--wheels", str(whl), "--slice",
             str(slc), "--data", str(tmp_path / "cifar"), "--slice-train", "400", "--slice-test", "200"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable,
                                                              "PIP_NO_CACHE_DIR": "1"},
        )  # fmt: skip
        inst = install.result()
    t_ready = time.perf_counter() - t0
    assert prep.returncode == 0, prep.stderr[-3000:]
    assert inst.returncode == 0, inst.stderr[-3000:]
    call = json.loads(prep.stdout.strip().splitlines()[-1])
    assert call == {"command": "bash benchmarks/device/run.sh --budget 450", "carry": [".whl", ".cifar100-slice"],
                    "timeout_s": 540}  # fmt: skip
    needs = (whl / bundle.IMAGE_NEEDS).read_text().split()
    installed = {bundle.canon(r.split("==")[0]) for r in image}
    assert set(needs) <= installed, f"the image packages the bundle relies on: {needs}"
    carried = {bundle.wheel_metadata(w).name for w in whl.glob("*.whl")}
    image_list = bundle.read_image_packages()
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "mnist1d"} <= carried
    assert all(n not in image_list or image_list[n] is None for n in carried)  # nothing the image has as needed
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    assert subprocess.run([str(py), "-c", "import kdlab"], capture_output=True, env=clean).returncode != 0
    assert subprocess.run([str(py), "-c", "import pydantic"], capture_output=True, env=clean).returncode != 0
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "device" / "run.sh"), "--device", "cpu", "--quick", "--budget", "900",
         "--wheels", str(whl), "--slice", str(slc), "--", "--methods", "kd,mlkd,crd"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**clean, "OUT": str(out), "PYTHON": str(py), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "gpu_check.json", "gpu_check.log", "gpu_check.md"]
    env_txt = (out / "env.txt").read_text()
    version = bundle.wheel_metadata(next(whl.glob("pydantic-*.whl"))).version
    assert f"pydantic {version}" in env_txt and f"torch {torch.__version__}" in env_txt
    assert "3/3 methods agree; 0 rows not run" in (out / "gpu_check.log").read_text()
    rows = {r["key"]: r for r in json.loads((out / "gpu_check.json").read_text())["rows"]}
    assert all(r["status"] == "ok" for r in rows.values())
    acc = rows["accuracy/kd"]["result"]
    assert acc["data"] == "cifar100" and acc["train_images"] == 256  # the decoded slice, not synthetic data
    assert rows["speed/cached/b16/bf16/eager"]["result"]["data"] == "cifar100"
    print(f"rehearsal: environment and bundle ready in {t_ready:.0f} s, all in {time.perf_counter() - t0:.0f} s")
