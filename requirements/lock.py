"""The lock files ``make install`` / ``make demo`` / ``make test`` install from, and the check that they fit.

    python requirements/lock.py generate [--pin-from-env] [--torch torch==2.13.0+cpu]   # (make lock)
    python requirements/lock.py check                                                   # (make install runs it)

``generate`` resolves kdlab with every optional extra except ``vision`` (torchvision is never used) in one pip
resolution (``pip install --dry-run --ignore-installed --report``, through pip's own configuration: its indexes,
``--find-links`` and constraints), then writes, each package pinned to one version with the SHA-256 of the file pip
chose (``pip install --require-hashes`` refuses anything else):

* ``torch-cpu.txt`` — torch itself (the CPU wheel pip's configuration finds; installed on its own so that a CUDA
  machine can swap in its build: ``make install TORCH=torch==2.13.0``);
* ``lock-run.txt`` — everything else kdlab needs to run (torch's own dependencies included);
* ``lock-extras.txt`` — what the extras add on top (test, trackers, images, slurm, tune, …).

``--pin-from-env`` keeps the versions installed in the running interpreter's environment (the one the README's numbers
were measured in) instead of the newest ones the resolver would choose; ``pip check`` after an install verifies the
set is consistent. The hashes are those of this platform's files: the header records the interpreter and platform,
and ``check`` refuses another one with a message (``make install LOCKED=0`` installs from pyproject's ranges instead;
``make lock`` on that machine writes its own lock).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FILES = {"torch": HERE / "torch-cpu.txt", "run": HERE / "lock-run.txt", "extras": HERE / "lock-extras.txt"}
SKIP_EXTRAS = {"vision"}  # torchvision is optional and never used by kdlab's own code
TARGET = "# target: "
INPUTS = "# inputs: "


def target() -> str:
    """The interpreter and platform a lock's hashes are valid for, e.g. ``cpython-3.11 linux-x86_64``."""
    impl = sys.implementation.name
    return f"{impl}-{sys.version_info.major}.{sys.version_info.minor} {sysconfig.get_platform()}"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        from pip._vendor import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _extras() -> list[str]:
    return sorted(set(_project().get("optional-dependencies", {})) - SKIP_EXTRAS)


def inputs_digest() -> str:
    """SHA-256 (16 hex digits) of what a lock is made from: pyproject's dependencies and the locked extras."""
    project = _project()
    extras = {k: sorted(v) for k, v in project.get("optional-dependencies", {}).items() if k not in SKIP_EXTRAS}
    data = json.dumps({"dependencies": sorted(project.get("dependencies", [])), "extras": extras}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def _resolve(torch: str, pins: list[str]) -> list[dict]:
    """pip's resolution of ``.[extras]`` plus ``torch`` (and ``pins`` as constraints): the report's install items."""
    with tempfile.TemporaryDirectory() as tmp:
        report, constraints = Path(tmp) / "report.json", Path(tmp) / "pins.txt"
        constraints.write_text("\n".join(pins) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "-c", str(constraints), torch, f"{ROOT}[{','.join(_extras())}]"]  # fmt: skip
        subprocess.run(cmd, check=True)
        return json.loads(report.read_text())["install"]


def _closure(items: dict[str, dict], roots: list[str]) -> set[str]:
    """Names reachable from the requirement strings ``roots`` through the items' ``requires_dist`` (markers evaluated
    for this interpreter, each requirement's own extras followed)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare venv: pip's own copy
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = _norm(req.name)
        if name not in items:
            continue
        for e in [""] + sorted(req.extras):
            key = f"{name}[{e}]"
            if key in seen:
                continue
            seen.add(key)
            todo += [(Requirement(r), e) for r in items[name]["metadata"].get("requires_dist", [])]
    return {k.split("[")[0] for k in seen}


def _line(item: dict) -> str:
    meta, info = item["metadata"], item["download_info"]
    hashes = info.get("archive_info", {}).get("hashes", {})
    sha = hashes.get("sha256") or info.get("archive_info", {}).get("hash", "").removeprefix("sha256=")
    if not sha:
        raise SystemExit(f"no sha256 for {meta['name']} {meta['version']} ({info.get('url')})")
    return f"{meta['name']}=={meta['version']} \\\n    --hash=sha256:{sha}"


def generate(torch: str, pin_from_env: bool) -> None:
    pins = []
    if pin_from_env:
        pins = [f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                if _norm(d.metadata["Name"]) not in ("kdlab", "pip", "torch")]  # fmt: skip
    install = _resolve(torch, pins)
    items = {_norm(i["metadata"]["name"]): i for i in install if _norm(i["metadata"]["name"]) != "kdlab"}
    kdlab = next(i for i in install if _norm(i["metadata"]["name"]) == "kdlab")
    base = [r for r in kdlab["metadata"].get("requires_dist", []) if "extra ==" not in r]
    run = _closure(items, base) - {"torch"}
    extras = set(items) - run - {"torch"}
    how = "python requirements/lock.py generate" + (" --pin-from-env" if pin_from_env else "")
    head = [f"# Generated by `{how}` (make lock); do not edit.", f"{TARGET}{target()}",
            f"{INPUTS}{inputs_digest()} (pyproject.toml's dependencies and extras)"]  # fmt: skip
    groups = {"torch": ["torch"], "run": sorted(run), "extras": sorted(extras)}
    about = {"torch": "torch, hash-checked (make install TORCH=torch==X for another build)",
             "run": "what kdlab needs to run, torch excepted", "extras": f"added by the extras {', '.join(_extras())}"}
    for key, names in groups.items():
        body = [_line(items[n]) for n in names]
        FILES[key].write_text("\n".join(head + [f"# {about[key]}", ""] + body) + "\n")
        print(f"wrote {FILES[key].relative_to(ROOT)}: {len(body)} packages")


def check() -> int:
    """0 when the lock's target is this interpreter and platform; else a message and 1."""
    for path in FILES.values():
        if not path.is_file():
            print(f"{path.relative_to(ROOT)} is missing: run `make lock`, or `make ... LOCKED=0`", file=sys.stderr)
            return 1
        lines = path.read_text().splitlines()
        wanted = next((ln for ln in lines if ln.startswith(TARGET)), TARGET + "unknown").removeprefix(TARGET)
        made_from = next((ln for ln in lines if ln.startswith(INPUTS)), INPUTS).removeprefix(INPUTS).split(" ")[0]
        if made_from != inputs_digest():
            print(f"{path.relative_to(ROOT)} was written for other dependencies than pyproject.toml's now: run "
                  "`make lock` (and commit requirements/)", file=sys.stderr)  # fmt: skip
            return 1
        if wanted != target():
            print(f"{path.relative_to(ROOT)} holds the hashes of {wanted} files; this is {target()} "
                  f"({platform.platform()}). Install from pyproject's ranges with `make ... LOCKED=0` (versions, and "
                  "so numbers, may differ from the README's), or write this machine's lock with `make lock`.",
                  file=sys.stderr)  # fmt: skip
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="resolve and write the lock files")
    g.add_argument("--torch", default="torch==2.13.0+cpu", help="the torch requirement (default torch==2.13.0+cpu)")
    g.add_argument("--pin-from-env", action="store_true", help="keep this environment's installed versions")
    sub.add_parser("check", help="exit 1 with a message when the lock is for another interpreter or platform")
    args = p.parse_args(argv)
    if args.cmd == "generate":
        generate(args.torch, args.pin_from_env)
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
