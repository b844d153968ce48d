"""The environment a result was computed in: package versions, CPU model and instruction sets, thread counts, the
torch build and the kernels it dispatches to.

Float results of the same seed are exact on one machine with one environment and drift elsewhere: a different CPU
(instruction set, MKL / oneDNN code path), thread count or package version changes rounding, and training amplifies
it (README, "What is exact"). :func:`record` is written into every run's ``summary.json`` (``environment``) and, as
:func:`markdown`, under the demo's ``results.md``, so a number can always be traced to where it was made.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

#: instruction-set extensions that decide which CPU kernels torch, MKL and oneDNN run (x86 and Arm names)
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2",
    "bf16", "i8mm",
)  # fmt: skip
#: environment variables that change threads or kernels (recorded when set)
ENV_VARS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES", "KDLAB_SMOKE",
)  # fmt: skip
#: lines of ``torch.__config__.show()`` worth keeping (library versions and the dispatch level)
_BUILD_KEYS = {
    "compiler": r"^\s*-\s*(GCC|Clang|MSVC|Apple clang)\b.*",
    "mkl": r"Math Kernel Library Version ([\d.]+)",
    "onednn": r"MKL-DNN (v[\d.]+)",
    "openmp": r"OpenMP (\d+)",
    "cpu_capability_usage": r"CPU capability usage: (\S+)",
    "blas": r"BLAS_INFO=([^,]+)",
    "lapack": r"LAPACK_INFO=([^,]+)",
}


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none)."""
    from kdlab.errors import KdlabError
    from kdlab.fileio import read_text

    try:
        text = read_text("/proc/cpuinfo", "text", "CPU description")
    except (KdlabError, OSError):
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


@cache
def cpu() -> dict[str, Any]:
    """CPU model, vendor, instruction-set extensions (:data:`ISA_FLAGS` present) and core counts."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "model": info.get("model name") or info.get("Model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id") or info.get("CPU implementer") or "",
        "machine": platform.machine(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
    }


@cache
def packages() -> dict[str, str]:
    """Versions of kdlab and of every installed distribution it requires, extras included (name → version)."""
    out = {"kdlab": _version("kdlab") or "not installed"}
    for req in metadata.requires("kdlab") or [] if out["kdlab"] != "not installed" else []:
        name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
        version = _version(name)
        if version is not None:
            out[name] = version
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "kdlab", kv[0].lower())))


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def source_commit() -> str | None:
    """The git commit of the kdlab source tree (``+dirty`` with uncommitted changes), when run from a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty=+dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def torch_info() -> dict[str, Any]:
    """The torch build (version, library versions) and what it does now: CPU kernel level, threads, determinism,
    GPUs."""
    import torch

    show = torch.__config__.show()
    build = {}
    for key, pattern in _BUILD_KEYS.items():
        m = re.search(pattern, show, re.MULTILINE)
        if m:
            build[key] = m.group(0).strip(" -") if key == "compiler" else m.group(1)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "version": torch.__version__,
        "git": torch.version.git_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "build": build,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "gpus": gpus,
    }


def record() -> dict[str, Any]:
    """Everything above as one JSON-ready dict: kdlab commit, Python, OS, CPU, torch, packages, set variables."""
    return {
        "kdlab_commit": source_commit(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "cpu": cpu(),
        "torch": torch_info(),
        "packages": packages(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def markdown(env: dict[str, Any] | None = None) -> str:
    """``env`` (default: :func:`record` now) as a short markdown list, for results files."""
    env = env or record()
    t, c = env["torch"], env["cpu"]
    b = t["build"]
    libs = ", ".join(f"{k} {b[k]}" for k in ("mkl", "onednn", "openmp", "blas") if k in b)
    gpu = f"; GPUs: {', '.join(t['gpus'])} (CUDA {t['cuda']}, cuDNN {t['cudnn']})" if t["gpus"] else ""
    pkgs = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if k not in ("kdlab", "torch"))
    lines = [
        f"- kdlab {env['packages'].get('kdlab')} (commit {env['kdlab_commit'] or 'unknown'}), Python {env['python']}, "
        f"{env['os']}",
        f"- torch {t['version']}: CPU kernels {t['cpu_capability']}, {t['threads']} threads "
        f"({t['interop_threads']} inter-op), deterministic algorithms {'on' if t['deterministic'] else 'off'}; "
        f"{libs}{gpu}",
        f"- CPU: {c['model']} ({c['machine']}), {c['usable_cores']} of {c['logical_cores']} logical cores usable; "
        f"ISA: {' '.join(c['isa']) or 'unknown'}",
        f"- packages: {pkgs}",
    ]
    if env["env"]:
        lines.append("- set: " + ", ".join(f"{k}={v}" for k, v in env["env"].items()))
    return "\n".join(lines)


__all__ = ["ENV_VARS", "ISA_FLAGS", "cpu", "markdown", "packages", "record", "source_commit", "torch_info"]
