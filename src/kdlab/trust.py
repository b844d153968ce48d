"""Code trust: what a config may make kdlab import and call.

A config names user code as ``package.module:Name`` or ``path/to/file.py:Name`` (``model.name``, ``teacher.name``,
``teacher.ensemble[i].name``, ``data.name``: every field marked with :func:`names_code`). A run folder, a recipe or
a dataset may come from someone else, so every such string is classified first, **without importing anything**:

* a name without a colon is a kdlab registry name: nothing is imported;
* ``file.py:Name`` — any object, an ``nn.Module`` class included — is imported only with ``--trust-code`` (or
  ``KDLAB_TRUST_CODE=1``);
* ``package.module:Name`` is imported only if the module is installed. Its top-level package is located with
  :func:`importlib.util.find_spec` (a top-level name: nothing runs) and each submodule is located after its checked
  parent was imported, so every file is checked before it runs. A file counts as installed when it lies in the
  interpreter's library or site-packages folders, in a folder that a ``.pth`` file of site-packages adds (an editable
  install), or in the project folder of an editable install (``direct_url.json``) that provides this top-level
  package — wherever that is, a project's ``.venv`` inside the current directory included. Any other file must lie
  outside the current directory, every config file's folder and the run and data folders of the command
  (:func:`distrust_folder`); otherwise it is imported only with ``--trust-code``;
* once imported, an ``nn.Module`` subclass (model keys) is built without asking; any other callable (a factory such
  as ``timm:create_model``, a dataset builder, ``subprocess:Popen``) is called only with ``--trust-code``.

Every decision that needs ``--trust-code`` is a one-line :class:`UntrustedCodeError` naming the config key and the
flag, raised before the code in question is imported; whatever ``--trust-code`` allowed is recorded in the run
(``summary.json`` → ``trusted_code``, :func:`trusted_among`). :func:`vet_config` applies all of it to a raw config
mapping — every code key decided before anything is imported — and :func:`resolve_code` to one name::

    from kdlab.trust import resolve_code

    cls = resolve_code("mypkg.nets:Net", what="model.name", kind="model")   # an installed nn.Module class: passes
    resolve_code("nets.py:Net", what="model.name", kind="model")            # UntrustedCodeError without the flag
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import site
import sys
import sysconfig
import typing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kdlab.errors import ConfigError, KdlabError

TRUST_ENV = "KDLAB_TRUST_CODE"
#: folders distrusted by a parent process (sweep/chain workers inherit them; it can only add folders)
FOLDERS_ENV = "KDLAB_DISTRUSTED_FOLDERS"
_FLAG = "--trust-code"
_NEEDS_FLAG = f"kdlab imports it only with {_FLAG} (or {TRUST_ENV}=1)"

_state: dict[str, bool | None] = {"trust": None}  # None: follow the environment variable
_trusted_names: set[str] = set()
_distrusted: dict[Path, str] = {}  # folder → what it is ("config's folder", "run folder", ...)

# markers on config fields (pydantic ``json_schema_extra``), read by vet_config and code_names
_CODE_KEY, _FOLDER_KEY = "kdlab_names_code", "kdlab_folder"
#: what a code key may name without --trust-code once imported: a model key accepts ``nn.Module`` classes
CODE_KINDS = ("model", "builder")


class UntrustedCodeError(ConfigError):
    """A config names code that kdlab may only import or call with ``--trust-code``."""


# ---- the switch -----------------------------------------------------------------------------------------------------


def trust_enabled() -> bool:
    """Whether code named in configs may be imported and called (``--trust-code`` or ``KDLAB_TRUST_CODE=1``)."""
    flag = _state["trust"]
    if flag is not None:
        return flag
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_trust(enabled: bool | None) -> None:
    """Set trust for this process (``None``: follow ``KDLAB_TRUST_CODE``). The CLI calls it for ``--trust-code``."""
    _state["trust"] = enabled


def trust_from_cli(flag: bool) -> None:
    """Trust for this process as the command line says (without ``--trust-code``: as ``KDLAB_TRUST_CODE`` says)."""
    set_trust(True if flag else None)


def child_env() -> dict[str, str]:
    """Environment entries that pass this process's trust and distrusted folders on to worker processes."""
    env = {TRUST_ENV: "1"} if trust_enabled() else {}
    folders = [str(p) for p in _distrusted]
    if folders:
        env[FOLDERS_ENV] = os.pathsep.join(folders)
    return env


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--trust-code`` flag (every ``kdlab`` command has it)."""
    parser.add_argument(
        _FLAG, action="store_true", dest="trust_code",
        help="allow configs to name code in .py files, in modules that are not installed, and callables other than "
        f"nn.Module classes (factories, dataset builders); also {TRUST_ENV}=1",
    )  # fmt: skip


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Temporarily trust (or distrust) code named in configs, e.g. for a pipeline worker or a test."""
    before = _state["trust"]
    _state["trust"] = enabled
    try:
        yield
    finally:
        _state["trust"] = before


def trusted_among(names: Iterable[str | None]) -> list[str]:
    """Those of ``names`` (a run's code names, :func:`code_names`) that were allowed only by ``--trust-code``: what
    the run records in its summary as ``trusted_code``."""
    return [n for n in dict.fromkeys(names) if n is not None and is_import_path(n) and n in _trusted_names]


def _allow(name: str, refusal: str) -> None:
    """Let ``name`` through on ``--trust-code`` (and record it), or refuse it with the one line ``refusal``."""
    if not trust_enabled():
        raise UntrustedCodeError(refusal)
    _trusted_names.add(name)


def allow_shell(what: str, text: str) -> None:
    """Shell text in a config (``launcher.setup`` lines, a ``launcher.python`` command, ``pipe:`` shard URLs in
    ``data.urls``) runs only with ``--trust-code``: a recipe or a run folder from someone else must not run commands
    on your machine or your cluster."""
    _allow(f"{what}: {text}", f"{what} runs shell commands ({text!r}); kdlab runs shell text named in a config "
                              f"only with {_FLAG} (or {TRUST_ENV}=1)")  # fmt: skip


# ---- where code may come from ---------------------------------------------------------------------------------------


def distrust_folder(path: str | Path | None, role: str) -> None:
    """Never count code inside ``path`` (a folder, or a file's folder) as installed: a command's run folder, a
    config's folder, a teacher's or a dataset's folder. Missing paths are ignored."""
    if path is None:
        return
    p = Path(os.path.expandvars(str(path))).expanduser()
    with contextlib.suppress(OSError):
        if p.is_file():
            p = p.parent
        if p.is_dir():
            _distrusted.setdefault(p.resolve(), role)


def _local_folders() -> list[tuple[Path, str]]:
    try:
        found = [(Path.cwd().resolve(), "current directory")]
    except OSError:  # the current directory was removed: nothing can be imported from it
        found = []
    found += _distrusted.items()
    for entry in os.environ.get(FOLDERS_ENV, "").split(os.pathsep):
        if entry:
            found.append((Path(entry), "folder distrusted by the parent process"))
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@functools.lru_cache(maxsize=1)
def _site_dirs() -> list[Path]:
    """site-packages folders of this interpreter (where installers put packages, ``.pth`` files and dist-info)."""
    dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [Path(d).resolve() for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _pth_entries(site_dir: Path) -> list[Path]:
    """Folders the ``.pth`` files of ``site_dir`` add to ``sys.path`` (editable installs)."""
    from kdlab.fileio import read_text

    found = []
    for pth in sorted(site_dir.glob("*.pth")):
        try:
            text = read_text(pth, "text")
        except KdlabError:
            continue
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith(("#", "import ", "import\t")):
                entry = (site_dir / line).resolve()
                if entry.is_dir():
                    found.append(entry)
    return found


@functools.lru_cache(maxsize=1)
def _installed_roots() -> list[Path]:
    """Folders whose modules count as installed: the standard library, site-packages and their ``.pth`` folders
    (read once per process, like ``site`` itself reads them once at start-up)."""
    paths = sysconfig.get_paths()
    roots = [Path(paths[k]).resolve() for k in ("stdlib", "platstdlib") if k in paths]
    for d in _site_dirs():
        roots += [d, *_pth_entries(d)]
    return roots


def _editable_projects(top: str) -> list[Path]:
    """Project folders of editable installs (dist-info in site-packages) that provide the top-level package ``top``."""
    sites = _site_dirs()
    found = []
    for dist in importlib.metadata.distributions():
        try:
            home = Path(str(dist.locate_file(""))).resolve()
            if not any(_inside(home, s) for s in sites):
                continue  # records elsewhere on sys.path (a dist-info in the current directory) are never read
            direct = dist.read_text("direct_url.json")
            tops = (dist.read_text("top_level.txt") or "").split()
        except (OSError, ValueError):
            continue
        if not direct or top not in tops:
            continue
        try:
            info = json.loads(direct)
        except ValueError:
            continue
        url = urlparse(str(info.get("url", "")))
        if (info.get("dir_info") or {}).get("editable") and url.scheme == "file":
            found.append(Path(unquote(url.path)).resolve())
    return found


def _not_installed(file: Path, top: str) -> str | None:
    """Why ``file`` (of the top-level package ``top``) may not be imported without trust, or None."""
    if any(_inside(file, root) for root in _installed_roots()):
        return None
    local = [(folder, role) for folder, role in _local_folders() if _inside(file, folder)]
    if not local or any(_inside(file, home) for home in _editable_projects(top)):
        return None
    folder, role = max(local, key=lambda fr: len(fr[0].parts))
    return f"is not installed ({file} lies in the {role} {folder})"


# ---- classifying a name (nothing is imported) -----------------------------------------------------------------------


@dataclass(frozen=True)
class CodeRef:
    """A config string that names code: ``file`` for ``path.py:attr``, else ``module`` for ``pkg.mod:attr``."""

    name: str
    attr: str
    file: Path | None = None
    module: str | None = None


def is_import_path(name: str) -> bool:
    """``module.path:Name`` or ``path/to/file.py:Name`` (kdlab's own registry names contain no colon)."""
    return ":" in name


def parse_code_ref(name: str, what: str) -> CodeRef | None:
    """Classify ``name`` without importing anything: None for a registry name, else a :class:`CodeRef`."""
    if not is_import_path(name):
        return None
    where, _, attr = name.rpartition(":")
    shape = f"{what} '{name}' must look like package.module:Name or path/to/file.py:Name"
    if not where or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ConfigError(shape)
    if where.endswith(".py") or "/" in where or os.sep in where or where.startswith("~"):
        if not where.endswith(".py"):
            raise ConfigError(f"{what} '{name}': {where} is not a .py file")
        return CodeRef(name, attr, file=Path(where).expanduser())
    if not all(part.isidentifier() for part in where.split(".")):
        raise ConfigError(shape)
    return CodeRef(name, attr, module=where)


def _module_file(spec: Any) -> Path | None:
    """The file a module spec would run (None for built-in, frozen and namespace modules)."""
    origin = getattr(spec, "origin", None)
    if not origin or not getattr(spec, "has_location", False):
        return None
    return Path(origin).resolve()


def _find_spec(module: str, name: str, what: str) -> Any:
    """The spec of ``module`` (its parent already imported and checked); a one-line error when there is none."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{what} '{name}': cannot import '{module}': {err}") from None
    if spec is None:
        raise ConfigError(f"{what} '{name}': cannot import '{module}': no module named '{module}' is installed")
    return spec


def _check_module(ref: CodeRef, module: str, what: str) -> None:
    """Refuse (or, with trust, record) ``module`` — part of ``ref`` — unless the file it would run is installed."""
    file = _module_file(_find_spec(module, ref.name, what))
    why = None if file is None else _not_installed(file, module.partition(".")[0])
    if why is not None:
        _allow(ref.name, f"{what} '{ref.name}': module '{module}' {why}; {_NEEDS_FLAG}")


def vet_code_ref(ref: CodeRef, what: str) -> None:
    """The decision for ``ref`` before anything is imported (its top-level package for ``pkg.mod:Name``); one-line
    :class:`UntrustedCodeError` unless allowed. Names allowed by ``--trust-code`` are recorded."""
    if ref.file is not None:
        from kdlab.fileio import check_file

        check_file(ref.file, "text", f"{what} '{ref.name}': file", ConfigError)
        _allow(ref.name, f"{what} '{ref.name}' names code in a Python file; {_NEEDS_FLAG}")
    else:
        _check_module(ref, str(ref.module).partition(".")[0], what)


# ---- importing (after the decision) ---------------------------------------------------------------------------------


def _load_file_module(path: Path, name: str, what: str) -> object:
    from kdlab.fileio import read_text

    resolved = path.resolve()
    mod_name = f"kdlab_user_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    source = read_text(resolved, "text", f"{what} '{name}': file", ConfigError)
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None:
        raise ConfigError(f"{what} '{name}': cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        exec(compile(source, str(resolved), "exec"), module.__dict__)  # the bounded read above, not a second open
    except Exception as err:
        del sys.modules[mod_name]
        raise ConfigError(f"{what} '{name}': importing {path} failed: {type(err).__name__}: {err}") from None
    return module


def _import_module(ref: CodeRef, what: str) -> object:
    """Import ``ref.module`` one level at a time, checking each submodule's file before it runs."""
    parts = str(ref.module).split(".")
    module: object = None
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if i > 1:
            _check_module(ref, sub, what)
        try:
            module = importlib.import_module(sub)
        except ImportError as err:
            raise ConfigError(f"{what} '{ref.name}': cannot import '{sub}': {err}") from None
        except Exception as err:
            raise ConfigError(f"{what} '{ref.name}': importing '{sub}' failed: {type(err).__name__}: {err}") from None
    return module


def import_object(name: str, *, what: str) -> object:
    """The object named by ``module.path:Attr`` or ``file.py:Attr`` — decided (:func:`vet_code_ref`), then
    imported, never called. ``what`` names the config key for the one-line errors (e.g. ``"model.name"``)."""
    ref = parse_code_ref(name, what)
    if ref is None:
        raise ConfigError(f"{what} '{name}' must look like package.module:Name or path/to/file.py:Name")
    vet_code_ref(ref, what)
    obj = _load_file_module(ref.file, name, what) if ref.file is not None else _import_module(ref, what)
    for part in ref.attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            where = ref.file if ref.file is not None else ref.module
            raise ConfigError(f"{what} '{name}': '{where}' has no attribute '{ref.attr}'")
    return obj


def _allowed_class(kind: str) -> tuple[type, ...]:
    if kind not in CODE_KINDS:
        raise ValueError(f"unknown code kind '{kind}'")
    if kind == "model":
        from torch import nn

        return (nn.Module,)
    return ()


def require_trusted(name: str, obj: object, *, what: str, allowed: type | tuple[type, ...] = ()) -> None:
    """Allow calling ``obj`` (named ``name`` by the config key ``what``) or raise :class:`UntrustedCodeError`.

    A class that is a subclass of ``allowed`` passes without trust; anything else callable needs trust and is then
    recorded (:func:`trusted_among`). Something not callable at all is a plain :class:`~kdlab.errors.ConfigError`.
    """
    if allowed and isinstance(obj, type) and issubclass(obj, allowed):
        return
    if not callable(obj):
        raise ConfigError(f"{what} '{name}' is a {type(obj).__name__}, not something kdlab can call")
    kinds = allowed if isinstance(allowed, tuple) else (allowed,)
    kind = " or ".join(("nn." if k.__module__.startswith("torch.nn") else "") + k.__name__ for k in kinds)
    isnt = f", not a subclass of {kind}" if kind else ""
    _allow(name, f"{what} '{name}' is a {type(obj).__name__}{isnt}; kdlab calls such code named in a config only "
                 f"with {_FLAG} (or {TRUST_ENV}=1)")  # fmt: skip


def resolve_code(name: str, *, what: str, kind: str) -> Any:
    """:func:`import_object` then :func:`require_trusted` for a code key of ``kind`` (``"model"``: ``nn.Module``
    classes pass; ``"builder"``: any callable needs trust). Nothing is called."""
    obj = import_object(name, what=what)
    require_trusted(name, obj, what=what, allowed=_allowed_class(kind))
    return obj


# ---- configs --------------------------------------------------------------------------------------------------------


def names_code(kind: str) -> dict[str, str]:
    """``json_schema_extra`` of a config field that may name code (``kind``: ``"model"`` or ``"builder"``)."""
    if kind not in CODE_KINDS:
        raise ValueError(f"unknown code kind '{kind}'")
    return {_CODE_KEY: kind}


def names_folder(role: str) -> dict[str, str]:
    """``json_schema_extra`` of a config field naming a folder or file from outside (data, a teacher's run): code
    inside that folder does not count as installed (``role`` names it in messages)."""
    return {_FOLDER_KEY: role}


def _nested(annotation: Any) -> tuple[Any, bool]:
    """The pydantic model inside a field's annotation (``X``, ``X | None``, ``list[X]``) and whether it is a list."""
    if isinstance(annotation, type):
        return (annotation, False) if hasattr(annotation, "model_fields") else (None, False)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        inner, _ = _nested(args[0])
        return inner, True
    for arg in args:
        inner, many = _nested(arg)
        if inner is not None:
            return inner, many
    return None, False


def _marked(schema: Any, raw: Any, prefix: str = "") -> Iterator[tuple[str, Any, dict[str, str]]]:
    """``(key, value, marker)`` for every value of ``raw`` (a mapping shaped like ``schema``) in a marked field."""
    if not isinstance(raw, dict):
        return
    for name, field in schema.model_fields.items():
        if name not in raw:
            continue
        key, value = prefix + name, raw[name]
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if _CODE_KEY in extra or _FOLDER_KEY in extra:
            yield key, value, extra  # type: ignore[misc]
        inner, many = _nested(field.annotation)
        if inner is None:
            continue
        if many and isinstance(value, list):
            for i, item in enumerate(value):
                yield from _marked(inner, item, f"{key}[{i}].")
        elif not many:
            yield from _marked(inner, value, key + ".")


def vet_config(raw: Any, schema: Any) -> None:
    """Decide every code key of ``raw`` (a config mapping of the pydantic model ``schema``) before anything is
    imported, then import the allowed names and check what they are (:func:`resolve_code`). Folders named by the
    config (:func:`names_folder`) are distrusted first. One-line :class:`UntrustedCodeError` naming the key."""
    marked = list(_marked(schema, raw))
    for _, value, extra in marked:
        if isinstance(value, str) and _FOLDER_KEY in extra:
            distrust_folder(value, extra[_FOLDER_KEY])
    code = [(key, value, extra[_CODE_KEY]) for key, value, extra in marked if _CODE_KEY in extra]
    code = [(key, value, kind) for key, value, kind in code if isinstance(value, str) and is_import_path(value)]
    for key, value, _ in code:
        vet_code_ref(parse_code_ref(value, key), key)  # type: ignore[arg-type]
    for key, value, kind in code:
        resolve_code(value, what=key, kind=kind)


def code_names(cfg: Any) -> list[str]:
    """Every value of a validated config (a pydantic model) in a field that names code: what a run checks against
    :func:`trusted_among`."""
    return [v for _, v, extra in _marked(type(cfg), cfg.model_dump(mode="json")) if _CODE_KEY in extra and v]
