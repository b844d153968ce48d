"""Which torch APIs kdlab's source uses that another torch release lacks, read statically from that release's wheel.

kdlab must run on the device image's torch (2.11) as on the CI's (2.13), and on the lower bound in ``pyproject.toml``;
wheels of other releases cannot be imported here (other CUDA builds, other platforms), but their Python sources and
type stubs can be read. This lists every ``torch.…`` path ``src/`` reaches through its imports (``torch.amp.
GradScaler``, ``F.cross_entropy`` resolved through ``from torch.nn import functional as F``, names imported with
``from torch… import``), with the keyword arguments passed to it, plus every attribute ``src/`` calls that is a
``torch.Tensor`` or ``nn.Module`` method here; then looks each one up in a release's ``.py``/``.pyi`` files: the
module must exist and define the name (a ``def``, ``class``, assignment, import or stub entry), and each keyword must
appear in a signature of that name. The same look-up runs on the installed torch: what it misses there is the
heuristic's blind spot (names made at import time), listed apart, never reported as missing from the release.

Usage: ``python torch_api_audit.py TORCH_WHEEL [--src src/kdlab]`` (``pip download --no-deps --only-binary=:all:
--platform manylinux_2_28_aarch64 torch==X.Y.Z`` gives a CPU wheel of any release); exit 1 when the release lacks
something the installed torch has.
"""

from __future__ import annotations

import argparse
import ast
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------------------------
# What kdlab uses


class _Uses(ast.NodeVisitor):
    """Dotted torch paths (with keyword names) and method-like attribute names of one module."""

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}
        self.paths: dict[str, set[str]] = defaultdict(set)
        self.attrs: set[str] = set()

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name == "torch" or a.name.startswith("torch."):
                if a.asname:
                    self.alias[a.asname] = a.name
                else:
                    self.alias["torch"] = "torch"
                self.paths[a.name]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level == 0 and (mod == "torch" or mod.startswith("torch.")):
            for a in node.names:
                self.alias[a.asname or a.name] = f"{mod}.{a.name}"
                self.paths[f"{mod}.{a.name}"]

    def _path(self, node: ast.expr) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in self.alias:
            return ".".join([self.alias[node.id], *reversed(parts)])
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        path = self._path(node)
        if path is not None:
            self.paths[path]
        else:
            self.attrs.add(node.attr)
            self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        path = self._path(node.func) if isinstance(node.func, (ast.Attribute, ast.Name)) else None
        if path is not None:
            self.paths[path].update(k.arg for k in node.keywords if k.arg)
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in self.alias:
            self.paths[self.alias[node.id]]


def used_apis(src: Path) -> tuple[dict[str, set[str]], set[str]]:
    """``({torch path: keyword names}, {attribute names called on other objects})`` over every ``.py`` in ``src``."""
    paths: dict[str, set[str]] = defaultdict(set)
    attrs: set[str] = set()
    for f in sorted(src.rglob("*.py")):
        v = _Uses()
        v.visit(ast.parse(f.read_text(), str(f)))
        for p, kws in v.paths.items():
            paths[p] |= kws
        attrs |= v.attrs
    # a path that is a prefix of a longer used path is implied by it (torch.nn by torch.nn.Module)
    return {p: k for p, k in paths.items() if k or not any(q.startswith(p + ".") for q in paths)}, attrs


# ---------------------------------------------------------------------------------------------------------------------
# What a release has


class Release:
    """The ``.py`` and ``.pyi`` files of one torch release (a wheel, or an installed ``torch`` folder's parent)."""

    ROOT_EXTRA = ("torch/_C/__init__.pyi", "torch/_C/_VariableFunctions.pyi", "torch/functional.py",
                  "torch/_tensor.py", "torch/types.py", "torch/serialization.py", "torch/random.py",
                  "torch/autocast_mode.py", "torch/amp/autocast_mode.py")  # fmt: skip
    METHOD_FILES = ("torch/_C/__init__.pyi", "torch/_tensor.py", "torch/nn/modules/module.py")

    def __init__(self, files: dict[str, str], label: str) -> None:
        self.files, self.label = files, label
        self.everywhere = {"*": "\n".join(files.values())}  # one text for look-ups in any file

    @classmethod
    def from_wheel(cls, wheel: Path) -> Release:
        with zipfile.ZipFile(wheel) as z:
            files = {n: z.read(n).decode("utf-8", "replace") for n in z.namelist()
                     if n.startswith("torch/") and n.endswith((".py", ".pyi"))}  # fmt: skip
        return cls(files, wheel.name)

    @classmethod
    def installed(cls) -> Release:
        import torch

        base = Path(torch.__file__).parent.parent
        files = {str(f.relative_to(base)): f.read_text("utf-8", "replace")
                 for f in (base / "torch").rglob("*") if f.suffix in (".py", ".pyi") and f.is_file()}  # fmt: skip
        return cls(files, f"torch {torch.__version__} (installed)")

    def module_files(self, module: str, depth: int = 3) -> list[str]:
        """The files of ``module``, and of the modules it star-imports (``from .modules import *``), ``depth`` deep."""
        stem = module.replace(".", "/")
        names = [f"{stem}.py", f"{stem}.pyi", f"{stem}/__init__.py", f"{stem}/__init__.pyi"]
        found = [n for n in names if n in self.files]
        if found and module == "torch":
            found += [n for n in self.ROOT_EXTRA if n in self.files]
        for f in list(found) if depth else []:
            package = f.rsplit("/", 1)[0].replace("/", ".")
            for dots, name in re.findall(r"^\s*from\s+(\.*)([\w.]*)\s+import\s+\*", self.files[f], re.M):
                base = package.rsplit(".", len(dots) - 1)[0] if dots else ""
                target = ".".join(x for x in (base, name) if x)
                found += [g for g in self.module_files(target, depth - 1) if g not in found]
        return found

    def defines(self, files: Iterable[str] | None, name: str) -> bool:
        """Whether one of ``files`` (None: any file) defines ``name``."""
        pat = re.compile(
            rf"^\s*(?:async\s+)?def\s+{name}\b|^\s*class\s+{name}\b|^\s*{name}\s*[:=]|\bimport\b[^\n]*\b{name}\b"
            rf"|^\s*{name}\s*,|['\"]{name}['\"]|\bas\s+{name}\b|^\s*[\w, ]*\b{name}\b\s*(?:,[\w, ]*)?=",
            re.M,
        )
        texts = self.everywhere.values() if files is None else (self.files[f] for f in files)
        return any(pat.search(t) for t in texts)

    def signatures(self, files: Iterable[str] | None, name: str) -> list[str]:
        """The text of every ``def name(...)`` (and ``class name`` ``__init__``) signature in ``files`` (None: any)."""
        out = []
        for text in self.everywhere.values() if files is None else (self.files[f] for f in files):
            for m in re.finditer(rf"(?:def\s+{name}\s*\(|class\s+{name}\b)", text):
                chunk = text[m.start() : m.start() + 40000]
                if chunk.startswith("class"):  # its own __init__, not one in a docstring's example
                    indent = re.match(r"[ \t]*", text[text.rfind("\n", 0, m.start()) + 1 :]).group()  # type: ignore[union-attr]
                    init = re.search(rf"\n{indent}    def\s+__init__\s*\(", chunk)
                    chunk = chunk[init.start() + 1 :] if init else ""
                depth, end = 0, 0
                for i, ch in enumerate(chunk):
                    depth += ch == "("
                    depth -= ch == ")"
                    if depth == 0 and ch == ")":
                        end = i
                        break
                out.append(chunk[: end + 1])
        return out

    def lookup(self, path: str) -> tuple[bool, list[str]]:
        """Whether ``path`` exists here, and the files that define its last part (for its signatures)."""
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            files = self.module_files(".".join(parts[:cut]))
            if files:
                break
        else:
            return False, []
        rest = parts[cut:]
        if not rest:
            return True, []
        if not self.defines(files, rest[0]):
            return False, []
        if len(rest) == 1:
            return True, files
        # torch.X.attr with X a class or object of a module: look for attr in the files defining X or in the module
        return self.defines(files, rest[-1]) or self.defines(None, rest[-1]), files

    def has_kwarg(self, files: list[str], name: str, kwarg: str) -> bool:
        sigs = self.signatures(files, name) or self.signatures(None, name)
        return any(re.search(rf"\b{kwarg}\b|\*\*\w+", s) for s in sigs)

    def has_method(self, name: str) -> bool:
        return self.defines([f for f in self.METHOD_FILES if f in self.files], name)


def audit(paths: dict[str, set[str]], attrs: set[str], release: Release) -> list[str]:
    """What ``release`` lacks: ``path`` or ``path(kwarg=)`` or ``.method``."""
    missing = []
    for path, kwargs in sorted(paths.items()):
        ok, files = release.lookup(path)
        if not ok:
            missing.append(path)
            continue
        leaf = path.rsplit(".", 1)[-1]
        missing += [f"{path}({kw}=)" for kw in sorted(kwargs) if not release.has_kwarg(files, leaf, kw)]
    missing += [f".{a}" for a in sorted(attrs) if not release.has_method(a)]
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheels", nargs="+", type=Path, help="torch wheel(s) of the release(s) to check")
    p.add_argument("--src", type=Path, default=REPO / "src" / "kdlab", help="the source to audit (default: kdlab)")
    args = p.parse_args(argv)
    import torch

    paths, attrs = used_apis(args.src)
    methods = {a for a in attrs if not a.startswith("__") and (hasattr(torch.Tensor, a) or hasattr(torch.nn.Module, a))}
    here = Release.installed()
    blind = set(audit(paths, methods, here))
    print(f"{len(paths)} torch paths ({sum(map(len, paths.values()))} keywords) and {len(methods)} Tensor/Module "
          f"methods used in {args.src}; the look-up cannot confirm {len(blind)} of them on {here.label}: "
          + (", ".join(sorted(blind)) or "none"))  # fmt: skip
    bad = 0
    for wheel in args.wheels:
        release = Release.from_wheel(wheel)
        lacks = [m for m in audit(paths, methods, release) if m not in blind]
        print(f"{release.label}: " + ("has everything" if not lacks else "lacks " + ", ".join(lacks)))
        bad += bool(lacks)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
