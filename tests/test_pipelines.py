"""Pipelines: grid/seed/chain plans, resumable sweeps (killed and re-run), parallel workers, tables, comparison."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import CONFIGS, SMALL, run_kdlab, write_yaml

from kdlab.errors import ConfigError, KdlabError
from kdlab.pipelines import load_plan, parse_grid_arg, parse_seeds, run_plan
from kdlab.pipelines.axes import label_of, split_top_level
from kdlab.pipelines.plan import paper_number
from kdlab.pipelines.tables import Stat

MNIST = CONFIGS / "mnist1d"


# ---------------------------------------------------------------------------------------------------------------------
# parsing


def test_grid_values_are_yaml_and_commas_inside_brackets_are_kept():
    assert split_top_level("1,[2,3],{a: 1, b: 2},'x,y'") == ["1", "[2,3]", "{a: 1, b: 2}", "'x,y'"]
    ax = parse_grid_arg("method.temperature=1,4.0,.inf")
    assert ax.labels == ("1", "4.0", "inf")
    assert [ov[0][1] for ov in ax.overrides] == [1, 4.0, math.inf]
    ax = parse_grid_arg("method={name: kd, temperature: 2},{name: kd_inf}")
    assert ax.labels == ("name=kd,temperature=2", "name=kd_inf")
    assert ax.overrides[1] == ((("method",), {"name": "kd_inf"}),)
    assert parse_grid_arg("data.label_noise=0.0,0.2").labels == ("0.0", "0.2")
    for bad in ("method.temperature", "=1,2", "a.b=", "x=1,1"):
        with pytest.raises(ConfigError):
            parse_grid_arg(bad)
    assert label_of(None) == "null" and label_of(True) == "true" and label_of([1, 2]) == "[1,2]"


def test_seeds():
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,4,7") == [0, 4, 7] and parse_seeds([5]) == [5] and parse_seeds(None) is None
    for bad in ("0", "-1", "a", [1, 1], True, "1.5"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def _chain_spec(tmp_path: Path, **extra) -> Path:
    spec = {
        "overrides": {"train.epochs": 1},
        "seeds": 2,
        "stages": [
            {"name": "big", "recipe": str(MNIST / "teacher_cnn.yaml"), "seed": 0},
            {"name": "mid", "recipe": str(MNIST / "teacher_cnn.yaml"), "teacher": "big",
             "overrides": {"model.kwargs": {"widths": [8, 16, 32]}, "train.epochs": 3},
             "grid": {"m": {"ce": {"method": {"name": "ce"}}, "mse": {"method": {"name": "mse"}}}}},
            {"name": "small", "recipe": str(MNIST / "student_kd.yaml"), "ensemble": ["big"],
             "grid": {"method.temperature": [2.0, 4.0]},
             "meta": {"paper": "made up", "paper_top1": {"ce": {2.0: 70.0, 4.0: 71.5}, "mse": 72.0}}},
        ],
        **extra,
    }  # fmt: skip
    return write_yaml(tmp_path / "spec.yaml", spec)


def test_chain_plan_expansion_wires_teachers_ensembles_seeds_and_paper_numbers(tmp_path):
    plan = load_plan(_chain_spec(tmp_path), overrides=["train.epochs=2", "data.num_samples=1000"])
    out = tmp_path / "out"
    tasks = plan.expand(out)
    by = {(t.stage, t.cell, t.seed): t for t in tasks}
    assert [t.stage for t in tasks].count("big") == 1 and [t.stage for t in tasks].count("mid") == 4
    assert [t.stage for t in tasks].count("small") == 8
    big = by[("big", (), 0)]
    assert big.out == out / "big" / "seed_0" and big.cfg.seed == 0
    s = by[("small", (("m", "mse"), ("method.temperature", "4.0")), 1)]
    assert s.out == out / "small" / "m=mse,method.temperature=4.0" / "seed_1"
    mid = by[("mid", (("m", "mse"),), 1)]
    # the student's teacher is the medium run of the same cell and seed, with the medium's architecture
    assert s.teacher is mid and s.cfg.teacher.checkpoint == str(mid.out)
    assert s.cfg.teacher.name == "mnist1d_cnn" and s.cfg.teacher.kwargs == {"widths": [8, 16, 32]}
    # ensemble member: the big run (fixed seed 0) for every seed
    assert s.ensemble == [big] and s.cfg.teacher.ensemble[0].checkpoint == str(big.out)
    assert mid.teacher is big and mid.cfg.method.name == "mse"
    # override order: spec < stage < command line < axis; the seed and train.progress are set last
    assert big.cfg.train.epochs == 2 and mid.cfg.train.epochs == 2 and s.cfg.seed == 1 and not s.cfg.train.progress
    assert s.cfg.method.temperature == 4.0 and s.cfg.data.num_samples == 1000
    # nested paper numbers resolve per cell (a number at a shallower level covers deeper cells)
    assert by[("small", (("m", "ce"), ("method.temperature", "4.0")), 0)].cfg.meta["paper_top1"] == 71.5
    assert s.cfg.meta["paper_top1"] == 72.0 and s.cfg.meta["pipeline"]["cell"] == dict(s.cell)
    assert paper_number({"a": {1: 3}}, ["a", "2"]) is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"name": "a", "recipe": str(MNIST / "student_kd.yaml"), "teacher": "b"}]}, "not an earlier stage"),
        ({"stages": [{"name": "a", "recipe": "nope.yaml"}]}, "recipe not found"),
        ({"stages": [{"name": "a", "recipe": str(MNIST / "teacher_cnn.yaml"), "grid": {"x": [1]}},
                     {"name": "b", "recipe": str(MNIST / "student_kd.yaml"), "grid": {"x": [2]}}]}, "given twice"),
        ({"stages": [{"name": "a", "recipe": str(MNIST / "teacher_cnn.yaml")}], "extra": 1}, "unknown key"),
        ({"recipe": str(MNIST / "student_kd.yaml"), "grid": {"method.temperature": [1, 1]}}, "twice"),
        ({"recipe": str(MNIST / "student_kd.yaml"), "grid": {"method.temprature": [1, 2]}}, "method.temprature"),
    ],
)  # fmt: skip
def test_bad_specs_are_one_line_errors(tmp_path, change, message):
    path = write_yaml(tmp_path / "spec.yaml", change)
    with pytest.raises(KdlabError, match=message) as err:
        load_plan(path).expand(tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------------
# running


def test_chain_runs_tables_heatmap_and_compare(tmp_path, capsys):
    from kdlab.cli import main

    spec = _chain_spec(tmp_path, seeds=1)
    out = tmp_path / "out"
    code = main(["chain", spec, *SMALL, "--out", out])
    assert code == 0
    printed = capsys.readouterr()
    assert "## small" in printed.out and "7 runs in" in printed.err
    small = out / "small" / "m=mse,method.temperature=2.0" / "seed_0"
    cfg = yaml.safe_load((small / "config.yaml").read_text())
    mid = out / "mid" / "m=mse" / "seed_0"
    assert cfg["teacher"]["checkpoint"] == str(mid) and cfg["teacher"]["ensemble"][0]["checkpoint"] == str(out / "big" / "seed_0")
    s = json.loads((small / "summary.json").read_text())
    assert s["teacher_test_acc"] is not None and (small / "train_eval.json").is_file()
    md = (out / "results.md").read_text()
    assert "## big" in md and "## mid" in md and "| m | method.temperature | n |" in md
    assert (out / "heatmap_small.png").stat().st_size > 1000 and (out / "lines_small.png").is_file()
    rows = list(csv_rows(out / "results.csv"))
    assert len(rows) == 1 + 2 + 4 and {r["stage"] for r in rows} == {"big", "mid", "small"}
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["runs"]) == 7 and plan["runs"][-1]["teacher"] == "mid/m=mse/seed_0"
    # kdlab compare: grouped per cell, with the paper number and the difference
    assert main(["compare", out, "--csv", tmp_path / "cmp.csv"]) == 0
    table = capsys.readouterr().out
    line = next(ln for ln in table.splitlines() if "m=ce,method.temperature=4.0" in ln)
    assert "71.50" in line and "made up" in line
    # a second run of the same command does nothing and rewrites the same tables
    t0 = (small / "summary.json").stat().st_mtime_ns
    assert main(["chain", spec, *SMALL, "--out", out]) == 0
    assert "7 finished, 0 to resume, 0 new" in capsys.readouterr().err
    assert (small / "summary.json").stat().st_mtime_ns == t0
    # the same folder with another setting is refused before anything runs
    with pytest.raises(KdlabError, match="different 'optim.lr'"):
        run_plan(load_plan(spec, overrides=SMALL + ["optim.lr=0.2"]), out)


def csv_rows(path: Path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_failed_teacher_fails_its_students_and_is_reported_after_the_tables(tmp_path):
    spec = write_yaml(tmp_path / "spec.yaml", {
        "stages": [{"name": "t", "recipe": str(MNIST / "teacher_cnn.yaml"), "overrides": {"optim.lr": 1.0e30}},
                   {"name": "s", "recipe": str(MNIST / "student_kd.yaml"), "grid": {"method.temperature": [1, 4]}},
                   {"name": "ce", "recipe": str(MNIST / "student_ce.yaml")}],
    })  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(KdlabError, match=r"3 of 4 runs failed: t/seed_0: non-finite loss") as err:
        run_plan(load_plan(spec, overrides=SMALL), out)
    assert "teacher run t/seed_0 failed" in str(err.value)
    assert (out / "ce" / "seed_0" / "summary.json").is_file()  # independent stages still run
    md = (out / "results.md").read_text()
    assert "| 0/1 |" in md


def test_tables_report_mean_std_and_n(tmp_path):
    from kdlab.pipelines.tables import write_tables

    plan = load_plan(MNIST / "student_kd.yaml", grid=["method.temperature=1,4", "method.kd_weight=0.5,0.9"], seeds=3)
    tasks = plan.expand(tmp_path)
    results = {}
    for i, t in enumerate(tasks):
        if t.cell == (("method.temperature", "4"), ("method.kd_weight", "0.9")) and t.seed == 2:
            continue  # one seed missing in this cell
        acc = 60.0 + 10 * (t.cfg.method.temperature == 4) + t.seed
        results[t.out] = {"final_test_acc": acc, "best_test_acc": acc + 1, "train_eval_acc": acc + 5,
                          "teacher_test_acc": 98.0, "wall_time_s": 1.0}  # fmt: skip
    write_tables(tmp_path, tasks, results, title="t")
    rows = list(csv_rows(tmp_path / "results.csv"))
    assert len(rows) == 4
    r = rows[0]
    assert r["axis:method.temperature"] == "1" and r["n"] == "3" and float(r["final_test_acc_mean"]) == 61.0
    assert float(r["final_test_acc_std"]) == pytest.approx(1.0)
    assert rows[3]["n"] == "2" and float(rows[3]["final_test_acc_mean"]) == 70.5
    md = (tmp_path / "results.md").read_text()
    assert "| 1 | 0.5 | 3 | 61.00 ± 1.00 | 62.00 ± 1.00 | 66.00 ± 1.00 | 98.00 ± 0.00 |" in md
    assert "| 4 | 0.9 | 2/3 | 70.50 ± 0.71 |" in md
    assert (tmp_path / "heatmap_run.png").is_file()
    assert Stat.of([1.0]).text() == "1.00" and Stat.of([]) is None


def _popen(args: list, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "kdlab", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True, **kw)  # fmt: skip


def _epochs(run: Path) -> list[int]:
    f = run / "metrics.jsonl"
    return [json.loads(ln)["epoch"] for ln in f.read_text().splitlines()] if f.is_file() else []


def test_killed_sweep_rerun_finishes_only_the_missing_cells(tmp_path):
    """SIGKILL a sweep while a cell is half-way; the same command then skips finished cells, resumes the
    interrupted one exactly where it stopped and runs the rest."""
    out = tmp_path / "sweep"
    args = ["sweep", MNIST / "student_ce.yaml", *SMALL, "train.epochs=12", "--grid", "optim.lr=0.05,0.1",
            "--seeds", "2", "--out", out]  # fmt: skip
    cells = [out / f"optim.lr={lr}" / f"seed_{s}" for lr in ("0.05", "0.1") for s in (0, 1)]
    proc = _popen(args)
    deadline = time.time() + 180
    while True:
        finished = [c for c in cells if (c / "train_eval.json").is_file()]
        partial = [c for c in cells if 0 < len(_epochs(c)) < 12]
        if finished and partial:
            break
        assert proc.poll() is None, f"the sweep ended before it was killed: {proc.communicate()[1][-500:]}"
        assert time.time() < deadline, "timed out waiting for a finished and a half-way cell"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stamps = {c: ((c / "summary.json").stat().st_mtime_ns, (c / "summary.json").read_bytes()) for c in finished}
    done_before = [c for c in cells if (c / "train_eval.json").is_file()]
    r = run_kdlab(*args)
    assert r.returncode == 0, r.stderr
    head = next(ln for ln in r.stderr.splitlines() if ln.startswith("4 runs"))
    n_done = int(head.split(": ")[1].split(" finished")[0])
    assert n_done == len(done_before) >= 1 and "0 to resume" not in head
    assert sum(ln.split()[1] == "done" for ln in r.stderr.splitlines() if ln.startswith("[")) == n_done
    for c, (mtime, data) in stamps.items():  # finished cells untouched
        assert (c / "summary.json").stat().st_mtime_ns == mtime and (c / "summary.json").read_bytes() == data
    for c in cells:  # every cell finished, each epoch logged once (the interrupted one continued, not restarted)
        assert (c / "train_eval.json").is_file() and _epochs(c) == list(range(1, 13))
    rows = list(csv_rows(out / "results.csv"))
    assert [r["n"] for r in rows] == ["2", "2"]


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_parallel_workers_stop_with_their_parent_and_resume(tmp_path):
    out = tmp_path / "sweep"
    # the CNN: slow enough per epoch that both workers are surely mid-run at some moment
    args = ["sweep", MNIST / "teacher_cnn.yaml", *SMALL, "train.epochs=40", "--grid", "optim.lr=0.05,0.1",
            "--out", out, "--jobs", "2"]  # fmt: skip
    cells = [out / f"optim.lr={lr}" / "seed_0" for lr in ("0.05", "0.1")]
    proc = _popen(args)
    deadline = time.time() + 180
    while not all(0 < len(_epochs(c)) < 40 for c in cells):
        assert proc.poll() is None, proc.communicate()[1][-800:]
        assert time.time() < deadline
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must notice and stop
    proc.wait()
    t_end = time.time() + 10
    while any(Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split(")")[1][:3]
              for w in workers):  # fmt: skip
        assert time.time() < t_end, "worker processes outlived the killed sweep"
        time.sleep(0.1)
    logs = sorted((out / "logs").glob("*.log"))
    assert len(logs) == 2
    r = run_kdlab(*args[:-2])  # the same sweep, resumed in-process this time
    assert r.returncode == 0, r.stderr
    assert "2 runs in" in r.stderr and ", 0 new" in r.stderr  # both were started: finished or resumed
    for c in cells:
        assert _epochs(c) == list(range(1, 41))


def test_plan_teacher_cache_replays_the_teacher_exactly(tmp_path, teacher_run, capsys):
    from kdlab.cli import main

    args = ["sweep", MNIST / "student_kd.yaml", *SMALL, f"teacher.checkpoint={teacher_run}",
            "--grid", "method={name: kd, temperature: 2.0},{name: mse}"]  # fmt: skip
    assert main([*args, "--out", tmp_path / "live"]) == 0
    assert main([*args, "--out", tmp_path / "cached", "--teacher-cache", "1"]) == 0
    assert "teacher cache .teacher_cache/mnist1d_cnn-1v-" in capsys.readouterr().err
    caches = list((tmp_path / "cached" / ".teacher_cache").glob("*.safetensors"))
    assert len(caches) == 1  # one cache for the teacher, shared by both methods
    for cell in ("method=name=kd,temperature=2.0", "method=name=mse"):
        live, cached = (json.loads((tmp_path / v / cell / "seed_0" / "summary.json").read_text()) for v in ("live", "cached"))
        assert cached["final_test_acc"] == live["final_test_acc"] and cached["best_test_acc"] == live["best_test_acc"]
        cfg = yaml.safe_load((tmp_path / "cached" / cell / "seed_0" / "config.yaml").read_text())
        assert cfg["teacher"]["cache"] == str(caches[0])


def test_ensemble_teacher_works_with_every_logit_method(tmp_path, teacher_run):
    """kl-vs-mse §4.3: averaged logits of several teachers, for every method that reads only teacher logits."""
    from kdlab.config import load_config
    from kdlab.engine import Trainer
    from kdlab.engine.teachers import EnsembleTeacher
    from kdlab.methods import METHODS

    logit_methods = [m for m in METHODS if METHODS.get(m).needs_teacher and METHODS.get(m).teacher_outputs == ("logits",)]
    assert {"kd", "kd_inf", "mse", "dkd", "ctkd", "mlkd"} <= set(logit_methods)
    member = f"teacher.ensemble=[{{name: mnist1d_cnn, checkpoint: {teacher_run}}}]"
    for name in logit_methods:
        cfg = load_config(MNIST / "student_kd.yaml", [*SMALL, "train.epochs=1", f"teacher.checkpoint={teacher_run}",
                                                       member, f"method={{name: {name}}}"])  # fmt: skip
        trainer = Trainer(cfg, tmp_path / name)
        assert isinstance(trainer.teacher, EnsembleTeacher)
        summary = trainer.run().summary
        assert summary["final_test_acc"] >= 0, name
