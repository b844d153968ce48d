"""benchmarks/gpu_check.py: the row plan and its priorities, what the budget drops (before and while running), and a
quick CPU run of every row through the CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO


def _load(name: str, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod


gc = _load("gpu_check", REPO / "benchmarks" / "gpu_check.py")
Row = gc.Row


def _row(key, priority, est, needs=(), fn=None):
    return Row(key, "test", priority, est, fn or (lambda: {}), tuple(needs))


def test_select_keeps_the_most_important_rows_that_fit_and_their_needs():
    rows = [_row("a", 0, 5), _row("b", 1, 50), _row("d", 2, 40), _row("e", 3, 5, needs=["d"]), _row("c", 1, 10),
            _row("f", 4, 5)]  # fmt: skip
    kept = gc.select(rows, 70)
    assert [r.key for r in kept] == ["a", "b", "c", "f"]  # priority order, plan order within a priority
    by = {r.key: r for r in rows}
    assert by["d"].status == "dropped" and by["d"].note == "budget: 40 s estimated, 5 s left"
    assert by["e"].status == "dropped" and by["e"].note == "needs d"
    assert all(r.status == "planned" for r in kept)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0.1, 100)), min_size=1, max_size=25), st.floats(0, 400))
def test_select_never_keeps_a_less_important_row_at_the_cost_of_a_more_important_one(spec, budget):
    rows = [_row(f"r{i}", p, e) for i, (p, e) in enumerate(spec)]
    kept = gc.select(rows, budget)
    assert sum(r.estimate_s for r in kept) <= budget
    order = sorted(rows, key=lambda r: r.priority)
    for i, r in enumerate(order):
        if r not in kept:  # it did not fit beside the more important rows kept
            assert sum(k.estimate_s for k in order[:i] if k in kept) + r.estimate_s > budget


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def work(self, seconds, out=None):
        def fn():
            self.t += seconds
            return dict(out or {})

        return fn


def test_run_rows_scales_estimates_by_the_finished_rows_and_drops_what_no_longer_fits():
    clock, seen = FakeClock(), []
    rows = [_row("a", 0, 10, fn=clock.work(20)), _row("b", 1, 10, fn=clock.work(20, {"_status": "differs"})),
            _row("c", 2, 10, fn=clock.work(1)), _row("d", 3, 2, fn=clock.work(1))]  # fmt: skip
    gc.run_rows(rows, deadline=55, clock=clock, after=lambda r: seen.append((r.key, r.status)))
    # a and b took twice their estimate: c is expected to take 20 s with 15 left, d 4 s
    assert seen == [("a", "ok"), ("b", "differs"), ("c", "dropped"), ("d", "ok")]
    assert rows[0].wall_s == 20 and rows[2].note == "budget at run time: 20 s expected, 15 s left"
    assert rows[2].wall_s is None and clock.t == 41


def test_run_rows_reports_errors_skips_their_dependants_and_stops_at_the_budget():
    clock = FakeClock()

    def broken():
        raise ValueError("no such kernel\nsecond line")

    def over():
        clock.t += 3
        raise gc.BudgetExceeded

    rows = [_row("a", 0, 1, fn=broken), _row("b", 1, 1, needs=["a"]), _row("c", 2, 1, fn=over), _row("d", 3, 1)]
    gc.run_rows(rows, deadline=100, clock=clock)
    assert [r.status for r in rows] == ["error", "skipped", "stopped", "dropped"]
    assert rows[0].note == "ValueError: no such kernel" and rows[1].note == "needs a"
    assert rows[2].wall_s == 3 and rows[3].note == "the budget ran out"


def test_alarm_at_interrupts_a_row_at_the_deadline():
    t0 = time.monotonic()
    with pytest.raises(gc.BudgetExceeded):
        with gc.alarm_at(t0 + 0.2):
            while time.monotonic() - t0 < 30:
                pass
    assert time.monotonic() - t0 < 20


def _gpu_plan(**kw):
    ctx = gc.Ctx("cuda", REPO, False, None, kw.get("teacher"), 20, 20)
    return gc.plan(ctx, ["kd", "dkd", "crd"], (False, True))


def test_the_plan_runs_the_headline_and_correctness_first():
    rows = _gpu_plan()
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys)) == 1 + 3 + 3 * 2 * 2 * 3 + 3 + 1  # env, agree, 36 grid cells, accuracy, bench
    pri = {r.key: r.priority for r in rows}
    assert pri["env"] == 0 and pri["speed/cached/b512/bf16/eager"] == 1
    assert {pri[f"agree/{m}"] for m in ("kd", "dkd", "crd")} == {2}
    for r in rows:  # compiled after eager, fp32 after bf16, smaller batches after 512
        if r.part == "speed":
            _, mode, b, amp, comp = r.key.split("/")
            if comp == "compiled":
                assert r.priority > pri[f"speed/{mode}/{b}/{amp}/eager"]
            if amp == "none":
                assert r.priority > pri[f"speed/{mode}/{b}/bf16/eager"]
    kept = [r.key for r in gc.select(rows, 27)]
    assert kept == ["env", "speed/cached/b512/bf16/eager", "speed/student/b512/bf16/eager"]
    kept = {r.key for r in gc.select(_gpu_plan(), 420)}
    assert {"accuracy/teacher", "accuracy/kd", "speed/cached/b512/bf16/compiled"} <= kept
    with_teacher = {r.key: r for r in _gpu_plan(teacher="t.safetensors")}
    assert "accuracy/teacher" not in with_teacher and with_teacher["accuracy/kd"].needs == ()


def test_calibrate_takes_a_previous_runs_measured_seconds(tmp_path):
    rows = _gpu_plan()
    prev = tmp_path / "prev.json"
    prev.write_text(json.dumps({"rows": [{"key": "env", "wall_s": 3.5, "status": "ok"},
                                         {"key": "bench", "wall_s": 9.0, "status": "error"},
                                         {"key": "agree/kd", "wall_s": 1.25, "status": "differs"}]}))  # fmt: skip
    assert gc.calibrate(rows, prev) == 2
    by = {r.key: r for r in rows}
    assert by["env"].estimate_s == 3.5 and by["agree/kd"].estimate_s == 1.25 and by["bench"].estimate_s == 60.0


def test_plan_flag_prints_what_the_budget_keeps(capsys):
    assert gc.main(["--quick", "--device", "cpu", "--plan", "--budget", "14", "--methods", "kd"]) == 0
    out = capsys.readouterr().out
    assert "run   speed/cached/b16/bf16/eager" in out and "drop  bench" in out and "drop  accuracy/ce" in out
    assert out.strip().endswith("10/12 rows, 13 s of 14 s (all rows: 21 s)")


def test_quick_cpu_run_measures_every_row_and_writes_the_report(tmp_path, one_thread, capsys):
    """A miniature of every row on the CPU (the device run is the same code at full size)."""
    md, js = tmp_path / "report.md", tmp_path / "report.json"
    code = gc.main(["--device", "cpu", "--quick", "--methods", "kd,crd", "--out", str(md), "--json", str(js)])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert "2/2 methods agree; 0 rows not run" in capsys.readouterr().out
    rows = {r["key"]: r for r in json.loads(js.read_text())["rows"]}
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "ok"} == {}
    speed = [r for k, r in rows.items() if k.startswith("speed/")]
    assert len(speed) == 6 and all(r["result"]["images_per_s"] > 0 and r["wall_s"] > 0 for r in speed)
    assert rows["agree/crd"]["result"]["loss_rel_err"] == 0  # CPU against CPU: the same numbers
    assert [rows[f"accuracy/{w}"]["result"]["epochs"] for w in ("teacher", "kd", "ce")] == [1, 1, 1]
    assert rows["accuracy/kd"]["result"]["teacher"] == "resnet8"
    assert {r["mode"] for r in rows["bench"]["result"]["rows"]} == {"reference", "live", "cached", "student",
                                                                    "live-bf16"}  # fmt: skip
    text = md.read_text()
    for part in ("## Machine", "## Throughput", "## Loss and gradient agreement", "## Short CIFAR-100 runs",
                 "## kdlab bench"):  # fmt: skip
        assert part in text
    assert "| 16 | bf16 | eager |" in text and "| 16 | fp32 | eager |" in text and "| crd |" in text
    assert "Rows not measured" not in text


def test_every_full_size_row_has_a_valid_config(tmp_path):
    """The device rows are the quick ones at full size: their configs (resnet32x4 → resnet8x4 on the slice, batch up
    to 512, compiled, the accuracy runs' recipe) validate here."""
    ctx = gc.Ctx("cuda", tmp_path, False, tmp_path / "cifar100", None, 20, 20)
    for mode in gc.MODES:
        for batch in gc.BATCHES:
            cfg = gc._speed_cfg(ctx, mode, batch, "bf16", True, tmp_path / "c.safetensors" if mode == "cached" else None)
            assert (cfg.model.name, cfg.train.batch_size, cfg.train.compile, cfg.train.drop_last) == (
                "resnet8x4", batch, True, True)  # fmt: skip
            assert (cfg.teacher is None) == (mode == "student") and cfg.data.max_train_samples == 20000
    kd = gc._accuracy_cfg(ctx, "resnet8x4", tmp_path / "acc-teacher", "kd", 20)
    assert (kd.method.name, kd.teacher.name, kd.optim.lr, kd.schedule.name, kd.schedule.warmup_epochs) == (
        "kd", "resnet32x4", 0.1, "cosine", 1)  # fmt: skip
    assert kd.data.name == "cifar100" and kd.data.max_train_samples == 20000 and kd.train.epochs == 20
