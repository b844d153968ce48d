"""The README runs as written: its shell and Python blocks are executed, in order, in a fresh folder.

Set-up lines (``make …``, ``source .venv/bin/activate``) are not run: the test already runs inside the installed
environment. ``KDLAB_SMOKE=1`` (documented in the README) shrinks every run to one epoch on a slice of the data, so
the whole README runs in about a minute; everything else is executed exactly as printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHARED_DATA = ROOT.parent / "shared" / "data"
SETUP_LINE = re.compile(r"^\s*(make\b|source\s|\.\s)")
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block tagged ``bash`` or ``python``, in document order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text) if m.group(1) in ("bash", "python")]


def runnable_shell(code: str) -> str:
    """A shell block without its set-up lines (and their continuations)."""
    out, skipping = [], False
    for line in code.splitlines():
        if skipping or SETUP_LINE.match(line):
            skipping = line.rstrip().endswith("\\")
            continue
        out.append(line)
    return "\n".join(out)


def test_blocks_are_found_and_setup_lines_dropped() -> None:
    text = "x\n```bash\nmake install\nsource .venv/bin/activate\nkdlab keys\n```\n```python\nprint(1)\n```\n```text\nno\n```\n"
    blocks = readme_blocks(text)
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    assert runnable_shell(blocks[0][1]).strip() == "kdlab keys"


@pytest.mark.slow
def test_readme_runs_as_written(tmp_path: Path) -> None:
    if not (SHARED_DATA / "cifar100").is_dir():
        pytest.skip(f"the README's CIFAR-100 steps need {SHARED_DATA / 'cifar100'}")
    work = tmp_path / "clone"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    (work / "examples").symlink_to(ROOT / "examples")
    env = dict(
        os.environ,
        KDLAB_SMOKE="1",
        KDLAB_DATA_ROOT=str(SHARED_DATA),
        KDLAB_CACHE=str(tmp_path / "cache"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="2",
        MPLBACKEND="Agg",
    )
    blocks = readme_blocks(README.read_text())
    assert any(lang == "python" for lang, _ in blocks) and any(lang == "bash" for lang, _ in blocks)
    for i, (lang, code) in enumerate(blocks):
        if lang == "bash":
            cmd = ["bash", "-euo", "pipefail", "-c", runnable_shell(code)]
        else:
            cmd = [sys.executable, "-c", code]
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"README block {i} ({lang}) failed:\n{code}\n--- stderr ---\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    reports = list(work.rglob("*.html"))
    assert reports, "the README's report step wrote no HTML report"


def test_smoke_mode_shrinks_every_run_and_wins_over_overrides(monkeypatch) -> None:
    from kdlab.config import load_config

    recipe = ROOT / "configs" / "mnist1d" / "student_kd.yaml"
    monkeypatch.setenv("KDLAB_SMOKE", "0")
    cfg = load_config(recipe, ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.data.max_train_samples, cfg.data.max_test_samples) == (7, None, None)
    monkeypatch.setenv("KDLAB_SMOKE", "1")
    cfg = load_config(recipe, ["train.epochs=7"])
    assert (cfg.train.epochs, cfg.data.max_train_samples, cfg.data.max_test_samples) == (1, 1000, 500)
