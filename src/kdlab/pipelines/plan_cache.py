"""The teacher-output cache a plan makes for its students (``teacher_cache: V`` / ``--teacher-cache V``).

Every distillation run of such a plan gets ``teacher.cache`` = ``OUT/.teacher_cache/<teacher>-<V>v-<digest>``, built
once per teacher and data (the digest covers the settings that change the cached outputs) just before the first run
that needs it, and rebuilt if the teacher's weights changed. Runs started in parallel (worker processes, Slurm jobs)
build it once: the first holds a lock on it while the others wait.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kdlab.config import RunConfig, validate
from kdlab.engine.rundir import waiting_lock
from kdlab.errors import KdlabError

CACHE_DIR = ".teacher_cache"


def _non_default(section: Any, exclude: set[str]) -> dict[str, Any]:
    dump = section.model_dump(mode="json", exclude=exclude)
    fields = type(section).model_fields
    return {k: v for k, v in dump.items() if k not in fields or fields[k].is_required() or v != fields[k].get_default(
        call_default_factory=True)}  # fmt: skip


def same_plan_cache(a: str | None, b: str | None) -> bool:
    """Two plan-made cache paths of the same teacher name and views (they differ at most in their digest)."""
    if not a or not b:
        return False
    pa, pb = Path(a), Path(b)
    if pa.parent.name != CACHE_DIR or pb.parent != pa.parent:
        return False
    return pa.name.rsplit("-", 1)[0] == pb.name.rsplit("-", 1)[0]


def with_cache(cfg: RunConfig, out: Path, views: int) -> RunConfig:
    """``cfg`` with ``teacher.cache`` set to the plan's cache for its teacher and data (distillation runs only)."""
    from kdlab.engine.teacher_cache import cache_refusal
    from kdlab.methods import build_method

    method = build_method(cfg.method.name, cfg.method.params())
    if cfg.teacher is None or cfg.teacher.cache or not method.needs_teacher:
        return cfg
    if cache_refusal(cfg.method.name, method):
        return cfg  # stage features or batch statistics are not cached: these runs keep a live teacher
    key = {  # settings left at their defaults are left out, so that new config keys do not rename caches
        "teacher": _non_default(cfg.teacher, exclude={"cache"}),
        "data": _non_default(cfg.data, exclude={"label_noise", "label_noise_seed"}),
        "views": views, "fields": list(method.teacher_outputs),
    }  # fmt: skip
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:16]
    raw = cfg.to_dict()
    raw["teacher"]["cache"] = str(out / CACHE_DIR / f"{cfg.teacher.name}-{views}v-{digest}.safetensors")
    raw["meta"].setdefault("pipeline", {})["teacher_cache_views"] = views
    return validate(raw)


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (blocking): one process builds a cache, the others wait and then find it built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(path.with_name(path.name + ".lock")):
        yield


def ensure_teacher_cache(cfg: RunConfig, root: Path, log: Callable[[str], None] = lambda m: None) -> None:
    """Build the plan-made teacher-output cache of a run if it is missing or was made from other teacher weights."""
    if cfg.teacher is None or not cfg.teacher.cache:
        return
    path = Path(cfg.teacher.cache)
    if path.parent != Path(root) / CACHE_DIR:
        return  # the user's own cache: used as given
    import torch

    from kdlab.data import build_dataset
    from kdlab.engine.fastpath import FastPath
    from kdlab.engine.objective import select_device
    from kdlab.engine.teacher_cache import TeacherCache, build_cache
    from kdlab.engine.teachers import load_teacher, teacher_fingerprint
    from kdlab.methods import METHODS

    sha = teacher_fingerprint(cfg.teacher)
    with _build_lock(path):
        if path.is_file():
            try:
                if TeacherCache(path).info.meta.get("teacher_sha256") == sha:
                    return
            except KdlabError:
                pass
        t0 = time.perf_counter()
        device = select_device(cfg.train.device)
        data = build_dataset(cfg.data).to(device)
        teacher = load_teacher(cfg.teacher, data.num_classes).to(device)
        views = int((cfg.meta.get("pipeline") or {}).get("teacher_cache_views", 1))
        build_cache(
            teacher, data, views, path, augment_seed=cfg.data.augment_seed or 0,
            fields=METHODS.get(cfg.method.name).teacher_outputs, dtype=torch.float32,
            batch_size=cfg.train.eval_batch_size,
            meta={"teacher": cfg.teacher.name, "teacher_sha256": sha, "data": cfg.data.model_dump(mode="json")},
            fast=FastPath(cfg.train, device, data.example_batch(2)),  # the students' autocast / memory format
            fold_bn=cfg.teacher.fold_bn,
        )  # fmt: skip
    log(f"    teacher cache {path.relative_to(root)}: {views} view(s) ({time.perf_counter() - t0:.1f} s)")
