"""The device bundle: which wheels kdlab needs on the device image, fetching them here, and checking them there.

``prepare`` (here, by ``prepare.sh``): reads kdlab's dependencies from ``pyproject.toml`` and the image's packages from
``image_packages.txt``; every requirement the image does not meet is downloaded as a wheel for the device's Python
(``pip download --no-deps --only-binary=:all:``, one version each), and so, recursively, are the requirements of those
wheels. A requirement stays with the image when the image has the package and either its recorded version satisfies
the requirement or the requirement names no version. A travelling wheel that asks for a version of an image package
whose version is not recorded takes that package along too (pydantic pins a recent typing-extensions). Versions: the
one installed in the Python running ``prepare`` (the one the tests here ran on) when it satisfies the requirement,
else the newest. Then it writes the CIFAR-100 slice (``cifar_slice.py``), checks that the working tree plus the
carried folders stay under the size limit, and prints the device call.

``check`` (there, by ``run.sh``): every requirement of kdlab and of each carried wheel is importable in a satisfying
version; prints the versions in use, exits 2 naming what is missing or too old.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata as md
import json
import platform
import re
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
IMAGE_PACKAGES = HERE / "image_packages.txt"
IMAGE_NEEDS = "image-needs.txt"  # written beside the wheels
WHEEL_DIR, SLICE_DIR = ".whl", ".cifar100-slice"  # git-ignored, carried by the device call
DEVICE_PYTHON = "3.12.3"  # KINDS.md: python3 there is Python 3.12.3
# torch 2.11's wheels for CUDA 13 are manylinux_2_28 and run there, so glibc >= 2.28 is known; newer tags are not
DEVICE_GLIBC = (2, 28)
LIMIT_MIB = 60.0  # the device tool moves at most 64 MiB; keep 4 MiB for others' files that appear in the tree
RUN_BUDGET_S, CALL_TIMEOUT_S = 450, 540  # run.sh's budget (under 8 minutes); the call's timeout leaves 90 s over it


class BundleError(Exception):
    """The bundle cannot be made or does not hold together."""


def canon(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_image_packages(path: Path = IMAGE_PACKAGES) -> dict[str, str | None]:
    """``{name: version or None}`` from the image list (``NAME`` or ``NAME==VERSION`` a line, ``#`` comments)."""
    out: dict[str, str | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canon(name)] = version.strip() or None
    return out


def kdlab_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """kdlab's core dependencies (no extras: the GPU check needs none of them)."""
    import tomllib

    return [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]


def marker_env(python: str) -> dict[str, str]:
    """The environment markers of a CPython ``python`` (X.Y or X.Y.Z) on x86-64 Linux."""
    full = python if python.count(".") == 2 else python + ".0"
    env = dict(default_environment())
    env.update(python_version=".".join(full.split(".")[:2]), python_full_version=full, sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")  # fmt: skip
    return env


def applies(req: Requirement, env: dict[str, str]) -> bool:
    """True when ``req`` holds in ``env`` (a requirement behind an extra never does: extras are not installed)."""
    return req.marker is None or req.marker.evaluate(env)


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: str
    requires: tuple[str, ...]


def wheel_metadata(path: Path) -> Wheel:
    """Name, version and ``Requires-Dist`` of a wheel file, read from its METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise BundleError(f"{path.name}: expected one .dist-info/METADATA, found {len(meta)}")
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode())
    return Wheel(path, canon(msg["Name"]), msg["Version"], tuple(msg.get_all("Requires-Dist") or ()))


@dataclass
class Plan:
    """What travels (``wheels``, in download order), why each requirement is met (``met``: requirement, by), and the
    image packages the bundle relies on (``from_image``)."""

    wheels: dict[str, Wheel] = field(default_factory=dict)
    met: list[tuple[str, str]] = field(default_factory=list)
    from_image: dict[str, None] = field(default_factory=dict)  # an ordered set


def resolve(
    requirements: list[Requirement], image: dict[str, str | None], env: dict[str, str],
    fetch: Callable[[list[str]], list[Path]], pins: dict[str, str] | None = None,
) -> Plan:  # fmt: skip
    """Every wheel needed beside the image for ``requirements``, one level of requirements at a time;
    ``fetch(specs)`` downloads one wheel for each pip requirement string and returns their paths. Raises when the
    requirers of a distribution admit no common version, or kdlab itself needs a version the image does not have."""
    pins = pins or {}
    plan = Plan()
    level: list[tuple[Requirement, bool]] = [(r, False) for r in requirements]  # (requirement, asked by a wheel)
    while level:
        wanted: dict[str, tuple[str, SpecifierSet]] = {}
        for req, from_wheel in level:
            if not applies(req, env):
                continue
            name = canon(req.name)
            if name in plan.wheels:
                have = plan.wheels[name]
                if not req.specifier.contains(have.version, prereleases=True):
                    raise BundleError(f"{name} {have.version} travels, but {req} is needed too: no single version")
                continue
            if name in image and name not in wanted:
                version = image[name]
                if version is not None and req.specifier.contains(version, prereleases=True):
                    plan.met.append((str(req), f"image ({version})"))
                    plan.from_image[name] = None
                    continue
                if version is None and (not req.specifier or not from_wheel):
                    plan.met.append((str(req), "image (version checked on the device)"))
                    plan.from_image[name] = None
                    continue
                if version is not None and not from_wheel:
                    raise BundleError(f"kdlab needs {req}, the image has {name} {version}: change the bound")
            raw, spec = wanted.get(name, (req.name, SpecifierSet()))
            wanted[name] = (raw, spec & req.specifier)
        if not wanted:
            break
        specs = []
        for name, (raw, spec) in wanted.items():
            pin = pins.get(name)
            specs.append(f"{raw}=={pin}" if pin and spec.contains(pin, prereleases=True) else f"{raw}{spec}")
        wheels = {w.name: w for w in map(wheel_metadata, fetch(specs))}
        for (name, (raw, spec)), asked in zip(wanted.items(), specs):
            w = wheels.get(name)
            if w is None or not spec.contains(w.version, prereleases=True):
                raise BundleError(f"asked for {asked}, got {', '.join(x.path.name for x in wheels.values())}")
            plan.wheels[name] = w
            plan.met.append((f"{raw}{spec}", f"wheel {w.path.name}"))
        level = [(Requirement(r), True) for w in wheels.values() for r in w.requires]
    return plan


def platforms(glibc: tuple[int, int]) -> list[str]:
    """manylinux tags a glibc ``glibc`` accepts, newest first (pip matches ``--platform`` tags exactly)."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 16, -1)]
    return tags + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def pip_fetcher(dest: Path, python: str, glibc: tuple[int, int]) -> Callable[[list[str]], list[Path]]:
    """``fetch(specs)`` by ``pip download --no-deps --only-binary=:all:`` for CPython ``python`` on x86-64 Linux."""
    short = "".join(python.split(".")[:2])
    base = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
            "--python-version", short, "--implementation", "cp", "--abi", f"cp{short}", "--abi", "abi3",
            "--abi", "none", "-d", str(dest)]  # fmt: skip
    for tag in platforms(glibc):
        base += ["--platform", tag]

    def fetch(specs: list[str]) -> list[Path]:
        before = set(dest.glob("*.whl"))
        proc = subprocess.run([*base, *specs], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise BundleError(f"pip download {' '.join(specs)} failed: {tail}")
        new = sorted(set(dest.glob("*.whl")) - before)
        if len(new) != len(specs):
            raise BundleError(f"pip download {' '.join(specs)} left {len(new)} new wheels in {dest}")
        return new

    return fetch


def local_pins() -> dict[str, str]:
    """The versions installed in the Python running this (the environment the tests here use)."""
    return {canon(d.metadata["Name"]): d.version for d in md.distributions() if d.metadata["Name"]}


def travelling_bytes(root: Path, carried: list[Path]) -> int:
    """Bytes the device call moves: tracked and untracked-not-ignored files, plus the carried folders."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout  # fmt: skip
    total = 0
    for rel in out.decode().split("\0"):
        p = root / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    for c in carried:
        total += sum(f.stat().st_size for f in c.rglob("*") if f.is_file())
    return total


def device_call(budget: int = RUN_BUDGET_S) -> dict:
    return {"command": f"bash benchmarks/device/run.sh --budget {budget}", "carry": [WHEEL_DIR, SLICE_DIR],
            "timeout_s": CALL_TIMEOUT_S}  # fmt: skip


def prepare(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    if args.local:  # the rehearsal: wheels for the Python running this, on this machine
        python, glibc = platform.python_version(), _local_glibc()
    else:
        python, glibc = args.python, tuple(int(x) for x in args.glibc.split("."))
    whl = Path(args.wheels).resolve() if args.wheels else root / WHEEL_DIR
    whl.mkdir(parents=True, exist_ok=True)
    for old in [*whl.glob("*.whl"), whl / IMAGE_NEEDS]:  # one version of each: nothing left from an earlier prepare
        old.unlink(missing_ok=True)
    t0 = time.perf_counter()
    plan = resolve(kdlab_requirements(root / "pyproject.toml"), read_image_packages(), marker_env(python),
                   pip_fetcher(whl, python, glibc), None if args.newest else local_pins())  # type: ignore[arg-type]  # fmt: skip
    print(f"wheels for CPython {python}, glibc >= {'.'.join(map(str, glibc))} ({time.perf_counter() - t0:.1f} s):")
    for req, by in plan.met:
        print(f"  {req:<32} {by}")
    plan.from_image["packaging"] = None  # bundle.py's own need there (run.sh's check)
    if args.slice_train:
        plan.from_image["pillow"] = None  # cifar_slice.py decodes the slice with Pillow there
    # the image packages relied on, for the CPU rehearsal to install beside torch (pip --target ignores the file)
    (whl / IMAGE_NEEDS).write_text("".join(f"{n}\n" for n in plan.from_image))
    carried = [whl]
    if args.slice_train:
        from cifar_slice import write

        slice_dir = Path(args.slice).resolve() if args.slice else root / SLICE_DIR
        t0 = time.perf_counter()
        write(Path(args.data), slice_dir, args.slice_train, args.slice_test)
        size = sum(f.stat().st_size for f in slice_dir.iterdir()) / 2**20
        print(f"CIFAR-100 slice: first {args.slice_train} train + {args.slice_test} test images, {size:.1f} MiB in "
              f"{slice_dir} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        carried.append(slice_dir)
    wheels_mib = sum(w.path.stat().st_size for w in plan.wheels.values()) / 2**20
    total = travelling_bytes(root, carried) / 2**20
    print(f"wheels: {len(plan.wheels)} files, {wheels_mib:.1f} MiB; working tree + carried: {total:.1f} MiB "
          f"(limit {args.limit_mib:g} MiB)")  # fmt: skip
    if total > args.limit_mib:
        print(f"prepare: error: {total:.1f} MiB would travel, over {args.limit_mib:g} MiB: write a smaller slice "
              "(--slice-train/--slice-test)", file=sys.stderr)  # fmt: skip
        return 2
    call = device_call()
    print("device call (the device tool's run, from the repository root):")
    print(json.dumps(call))
    return 0


def _local_glibc() -> tuple[int, int]:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        raise BundleError("cannot read this machine's glibc version: pass --glibc")
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def check(args: argparse.Namespace) -> int:
    """On the device: every requirement of kdlab and of the carried wheels is met by what Python imports."""
    env = marker_env(platform.python_version())
    wanted = [(r, "kdlab") for r in kdlab_requirements(Path(args.root) / "pyproject.toml")]
    for dist in md.distributions(path=[args.site]):
        wanted += [(Requirement(r), dist.metadata["Name"]) for r in dist.requires or []]
    bad, seen = [], {}
    for req, by in wanted:
        if not applies(req, env):
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req} (for {by}): not installed")
            continue
        seen[canon(req.name)] = version
        if not req.specifier.contains(Version(version), prereleases=True):
            bad.append(f"{req} (for {by}): {version} installed")
    print("python " + platform.python_version() + ", " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    if bad:
        print("bundle check: error: requirements not met:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="download the wheels, write the slice, check the size, print the device call")
    pr.add_argument("--root", default=str(REPO), help="repository root (default: this checkout)")
    pr.add_argument("--python", default=DEVICE_PYTHON, help=f"target CPython X.Y.Z (default: the device's, {DEVICE_PYTHON})")
    pr.add_argument("--glibc", default="%d.%d" % DEVICE_GLIBC, help="target glibc X.Y (default: %(default)s, known there)")
    pr.add_argument("--local", action="store_true", help="wheels for this Python and this machine (the CPU rehearsal)")
    pr.add_argument("--wheels", help=f"wheel folder (default: ROOT/{WHEEL_DIR})")
    pr.add_argument("--newest", action="store_true", help="newest versions, not the ones installed here")
    pr.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar100"),
                    help="CIFAR-100 folder (train.npz, test.npz; default: the shared data beside the checkout)")
    pr.add_argument("--slice", help=f"slice folder (default: ROOT/{SLICE_DIR})")
    pr.add_argument("--slice-train", type=int, default=20000, help="training images in the slice (0: no slice)")
    pr.add_argument("--slice-test", type=int, default=10000, help="test images in the slice")
    pr.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help="most MiB the call may move")
    ch = sub.add_parser("check", help="on the device: the carried wheels and the image meet every requirement")
    ch.add_argument("--root", default=str(REPO))
    ch.add_argument("--site", required=True, help="the folder the wheels were installed into")
    args = p.parse_args(argv)
    try:
        return prepare(args) if args.cmd == "prepare" else check(args)
    except (BundleError, OSError, subprocess.CalledProcessError) as err:
        print(f"bundle: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
