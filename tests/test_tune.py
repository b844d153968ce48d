"""kdlab tune (issue 20 §5): the space grammar, the val split held out of the training set, and real studies on tiny
MNIST-1D runs — two parallel workers sharing one study with pruning, a kill mid-study resumed by a rerun, and proof
that no trial reads the test split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, run_kdlab

pytest.importorskip("optuna")  # a declared dependency (the tune extra, which `make test` installs)

from optuna.trial import TrialState  # noqa: E402

from kdlab.cli import main  # noqa: E402
from kdlab.errors import ConfigError, DataError, UsageError  # noqa: E402
from kdlab.tune.space import parse_param, parse_space  # noqa: E402
from kdlab.tune.study import TuneSpec, counted, open_study, replaced  # noqa: E402

CE = CONFIGS / "mnist1d" / "student_ce.yaml"
KD = CONFIGS / "mnist1d" / "student_kd.yaml"
TINY = ["data.num_samples=1000", "train.batch_size=50", "train.threads=1"]  # 800 train (720 kept, 80 val)


def _trials(out: Path) -> list:
    return open_study(out, TuneSpec.load(out)).get_trials(deepcopy=False)


# ---- the space grammar ---------------------------------------------------------------------------------------------


def test_space_kinds_map_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = parse_param("method.temperature=log(1,16)").distribution()
    assert isinstance(d, FloatDistribution) and d.log and (d.low, d.high) == (1, 16)
    d = parse_param("optim.lr=uniform(1e-4, 0.5001, 0.01)").distribution()
    assert isinstance(d, FloatDistribution) and not d.log and d.step == 0.01 and d.low == 1e-4
    d = parse_param("train.batch_size=int(16,128,16)").distribution()
    assert isinstance(d, IntDistribution) and (d.low, d.high, d.step) == (16, 128, 16)
    assert parse_param("train.epochs=logint(1,64)").distribution().log
    p = parse_param("schedule.milestones=choice([150, 180], [100, 200], [1,2])")
    assert isinstance(p.distribution(), CategoricalDistribution)
    assert p.corners() == [[150, 180], [100, 200], [1, 2]] and p.value("[1,2]") == [1, 2]
    p = parse_param("method.name=choice(kd, dkd, 'a,b')")
    assert p.args == ("kd", "dkd", "a,b")
    assert parse_param("optim.lr=choice(1e-6, 0.1, 2, true, null)").args == (1e-6, 0.1, 2, True, None)


@pytest.mark.parametrize("text, message", [
    ("method.temperature", "must look like key.sub=KIND(ARGS)"),
    ("method.temperature=log(1,16", "must look like key.sub=KIND(ARGS)"),
    ("method.temperature=lognormal(1,16)", "unknown kind 'lognormal'"),
    ("method.temperature=log(0,16)", "log() needs low > 0 (a log scale)"),
    ("optim.lr=uniform(0,1,0.3)", "needs high - low to be a multiple of step 0.3"),
    ("method.temperature=log(16,1)", "needs low < high"),
    ("method.temperature=uniform(1)", "takes 2 or 3 arguments, got 1"),
    ("method.temperature=uniform(a,2)", "'a' is not a finite number"),
    ("method.temperature=uniform(1,nan)", "is not a finite number"),
    ("train.epochs=int(1.5,4)", "'1.5' is not an integer"),
    ("train.epochs=int(1,4,9)", "needs 0 < step <= high - low"),
    ("train.epochs=logint(0,4)", "needs low >= 1"),
    ("method.name=choice(kd)", "takes two or more values"),
    ("method.name=choice(kd,kd)", "lists a value twice"),
    ("method.name=choice(kd,)", "takes two or more values"),
], ids=lambda v: v if "=" in v or "." in v else None)  # fmt: skip
def test_malformed_space_is_one_line(text, message):
    with pytest.raises(UsageError, match=None) as err:
        parse_space([text])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_space_keys_once_and_not_nested():
    with pytest.raises(UsageError, match="names 'optim.lr' twice"):
        parse_space(["optim.lr=log(1e-3,1)", "optim.lr=uniform(0.1,1)"])
    with pytest.raises(UsageError, match="one lies inside the other"):
        parse_space(["optim=choice(a,b)", "optim.lr=uniform(0.1,1)"])


@pytest.mark.parametrize("extra, message", [
    (["--space", "method.temperatur=log(1,16)"], "method.temperatur=1"),  # a key the method lacks: at its low end
    (["--space", "method.temperature=uniform(0,16)"], "method.temperature=0"),  # a value the config refuses
    (["--space", "optim.lr=log(1e-3,1)", "optim.lr=0.1"], "'optim.lr' is both overridden and searched"),
    (["--space", "optim.lr=bogus(1,2)"], "unknown kind 'bogus'"),
    ([], "needs at least one --space"),
    (["--space", "optim.lr=log(1e-3,1)", "--pruner", "medain"], "unknown pruner 'medain' (did you mean 'median'?)"),
    (["--space", "optim.lr=log(1e-3,1)", "--sampler", "grid"], "unknown sampler 'grid'"),
    (["--space", "optim.lr=log(1e-3,1)", "data.val_split=1.5"], "data.val_split: must be a fraction below 1"),
    (["--space", "method.temperature=log(1,16)", "--dry-run"], "checkpoint not found: unused"),  # builds a trial
], ids=["unknown key", "refused value", "overridden and searched", "unknown kind", "no space", "unknown pruner",
        "unknown sampler", "bad val split", "dry run: missing teacher"])  # fmt: skip
def test_bad_tune_input_one_line_exit_2_nothing_written(tmp_path, capsys, extra, message):
    out = tmp_path / "study"
    code = main(["tune", KD, "teacher.checkpoint=unused", "data.num_samples=1000", "--trials", "2", "--out", out, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("kdlab: error: "), err
    assert message in err[0], err
    assert not out.exists()


# ---- the val split -------------------------------------------------------------------------------------------------


def _resident(n_train=50, n_test=20):
    from kdlab.data import Dataset, Split, VectorTransform

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n_train + n_test, 6, generator=g), torch.randint(0, 4, (n_train + n_test,), generator=g)
    x[:, 0] = torch.arange(n_train + n_test)  # the row's own number: which sample a batch holds
    return Dataset("toy", Split(x[:n_train], y[:n_train]), Split(x[n_train:], y[n_train:]), 4,
                   VectorTransform(shift=0))  # fmt: skip


def _rows(batches) -> tuple[list[int], list[int], list[int]]:
    xs, ys, idx = [], [], []
    for x, y, i in batches:
        xs += x[:, 0].round().long().tolist()
        ys += y.tolist()
        idx += i.tolist()
    return xs, ys, idx


def test_holdout_seeded_disjoint_and_recorded():
    from kdlab.data.holdout import holdout_indices, split_record

    tr, va = holdout_indices(100, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and set(tr.tolist()).isdisjoint(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(100))
    assert torch.equal(holdout_indices(100, 0.2, 3)[1], va)  # a pure function of (n, split, seed)
    assert not torch.equal(holdout_indices(100, 0.2, 4)[1], va)
    assert len(holdout_indices(100, 7, 0)[1]) == 7  # a whole number is a count
    rec = split_record(tr, va, 0.2, 3)
    assert rec["num_val"] == 20 and rec["num_train"] == 80 and len(rec["val_indices_sha256"]) == 64
    with pytest.raises(ConfigError, match="at least one kept for training"):
        holdout_indices(10, 10, 0)


def test_held_out_resident_data_batches_and_closed_test():
    from kdlab.data.holdout import HeldOut

    src = _resident()
    data = HeldOut(src, 0.2, 0, read_test=False)
    xs, ys, idx = _rows(data.train_batches(7, seed=1, epoch=1))
    assert sorted(xs) == data.train_idx.tolist() and sorted(idx) == list(range(40))  # kept samples, renumbered
    assert [data.train_idx[i] for i in idx] == xs and ys == src.train.y[xs].tolist()
    assert _rows(data.train_batches(7, seed=1, epoch=1)) == (xs, ys, idx)  # seeded
    assert _rows(data.train_batches(7, seed=1, epoch=2))[0] != xs  # reshuffled each epoch
    vx, vy, vidx = _rows(data.eval_batches("val", 4))
    assert vx == data.val_idx.tolist() and vidx == list(range(10)) and vy == data.labels("val").tolist()
    assert data.split_size("val") == 10 and data.split_size("test") == 20  # a size reads no sample
    for read in (lambda: data.eval_batches("test", 4), lambda: data.labels("test"),
                 lambda: data.example_batch(2, "test")):  # fmt: skip
        with pytest.raises(DataError, match="does not read the test split"):
            read()
    assert HeldOut(src, 0.2, 0).labels("test").tolist() == src.test.y.tolist()


def test_label_noise_flips_training_labels_only_val_keeps_the_given_ones():
    from kdlab.config import DataConfig
    from kdlab.data import build_dataset

    clean = build_dataset(DataConfig(num_samples=1000, val_split=0.25))
    noisy = build_dataset(DataConfig(num_samples=1000, val_split=0.25, label_noise=0.5))
    assert torch.equal(clean.labels("val"), noisy.labels("val"))
    assert (clean.labels("train") != noisy.labels("train")).float().mean() > 0.3
    assert noisy.num_train == 600 and noisy.split_size("val") == 200


def test_streamed_data_holds_out_by_index_subset():
    """A user's torch Dataset (streamed) gets the same val split as the same tensors held resident."""
    from kdlab.data.holdout import HeldOut
    from kdlab.data.stream import StreamingDataset

    class Items:  # an ItemSource (kdlab.data.stream): one sample at a time
        def __init__(self, split):
            self.split = split

        def __len__(self):
            return len(self.split)

        def load(self, index, view):
            return self.split.x[index], int(self.split.y[index])

    src = _resident()
    items = {s: Items(getattr(src, s)) for s in ("train", "test")}
    streamed = StreamingDataset("toy", items, 4, input_shape=(6,), finish=lambda x: x, workers=0)
    a, b = HeldOut(src, 0.3, 5), HeldOut(streamed, 0.3, 5)
    assert _rows(a.eval_batches("val", 4)) == _rows(b.eval_batches("val", 4))
    assert _rows(a.train_batches(8, seed=2, epoch=3)) == _rows(b.train_batches(8, seed=2, epoch=3))


# ---- studies -------------------------------------------------------------------------------------------------------


def test_in_process_study_never_reads_the_test_split(tmp_path, monkeypatch, one_thread, teacher_run, capsys):
    """The issue's distillation space, searched in this process. Every read of a dataset split is recorded: the test
    split is never among them (not even for the teacher's accuracy), each epoch's row and each summary number is a
    val one, and best.yaml is a recipe `kdlab distill --dry-run` accepts."""
    import kdlab.engine.trainer as trainer_mod
    from kdlab.data.base import Dataset
    from kdlab.tune.search import SearchOptions, build_spec, run_tune

    reads: list[str] = []
    for name in ("eval_batches", "labels", "example_batch"):
        orig = getattr(Dataset, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            split = next((v for v in a if isinstance(v, str)), kw.get("split", "train"))
            reads.append(split)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(Dataset, name, spy)
    evaluated: list[str] = []
    real_eval = trainer_mod.evaluate_split
    monkeypatch.setattr(trainer_mod, "evaluate_split",
                        lambda p, d, split, b: evaluated.append(split) or real_eval(p, d, split, b))  # fmt: skip
    out = tmp_path / "study"
    base = [f"teacher.checkpoint={teacher_run}", *TINY, "train.epochs=2"]
    space = ["method.temperature=log(1,16)", "method.kd_weight=uniform(0.1,10)", "optim.lr=log(0.003,0.3)"]
    spec, params = build_spec(str(KD), base, space, SearchOptions(trials=3, pruner="none"))
    run_tune(spec, params, out)
    assert "test" not in reads and "test" not in evaluated
    assert set(evaluated) == {"val"} and len(evaluated) == 3 * (1 + 2 + 1)  # teacher, 2 epochs, final; 3 trials
    assert "train" in reads  # the instrumentation saw the data being read (val batches come from the train tensors)
    for t in _trials(out):
        run = out / t.user_attrs["run_dir"]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert all("val_acc" in r and "test_acc" not in r for r in rows)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["final_test_acc"] is None and summary["selected_on"] == "val"
        assert summary["val_split"]["num_val"] == 80 and summary["final_val_acc"] == t.value
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"]["read_test"] is False and cfg["data"]["val_split"] == 0.1
        assert summary["teacher_val_acc"] is not None and summary["teacher_test_acc"] is None
    best = max(_trials(out), key=lambda t: t.value)
    run = out / best.user_attrs["run_dir"]  # `kdlab eval --split val` gives the trial's own number, test stays closed
    capsys.readouterr()
    assert main(["eval", run, "--split", "val", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["split"] == "val" and got["n"] == 80 and got["acc"] == pytest.approx(best.value, abs=1e-9)
    assert main(["eval", run]) == 2 and "data.read_test=true reads it" in capsys.readouterr().err
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["method"]["temperature"] == best.params["method.temperature"]
    assert recipe["method"]["kd_weight"] == best.params["method.kd_weight"]
    assert recipe["meta"]["tune"]["trial"] == best.number
    assert recipe["data"]["read_test"] is True and recipe["data"]["val_split"] == 0  # the recipe's own split
    assert main(["distill", out / "best.yaml", "--out", tmp_path / "final", "--dry-run"]) == 0
    assert "dry run ok" in capsys.readouterr().out
    imp = json.loads((out / "importance.json").read_text())
    assert set(imp) == {"method.temperature", "method.kd_weight", "optim.lr"} and abs(sum(imp.values()) - 1) < 1e-6
    assert "| method.temperature |" in (out / "results.md").read_text()
    # a rerun may raise --trials (the study continues); another space is refused
    spec4, _ = build_spec(str(KD), base, space, SearchOptions(trials=4, pruner="none"))
    run_tune(spec4, params, out)
    assert len(counted(_trials(out))) == 4
    other, p2 = build_spec(str(KD), base, ["method.temperature=log(2,16)", *space[1:]],
                           SearchOptions(trials=5, pruner="none"))  # fmt: skip
    with pytest.raises(ConfigError, match="holds a study with a different 'space'"):
        run_tune(other, p2, out)


GOOD, BAD = 0.1, 0.000001  # lr: epoch-1 val top-1 >= 20 % here, or stuck at chance (7.5 %)
PARALLEL_SPACE = [f"optim.lr=choice({GOOD}, {BAD})", "optim.momentum=uniform(0.8,0.95)"]


def _seed_where_each_worker_draws_good_then_bad(trials: int) -> int:
    """A --seed whose two workers (each seeded by kdlab.tune.worker.run_worker from the seed, its index and the
    trials in the study when it starts: 0, or 1 if the other worker asked first) both draw a good lr, then a bad one.
    Whatever the scheduling, the first bad trial to report epoch 1 then finds only good trials completed (each
    worker's own first trial is one), so the median pruner (after 1 trial) must prune it. (A worker that starts only
    after the other has claimed two trials changes nothing: that other worker's bad second trial is pruned.)"""
    import optuna

    from kdlab.seeding import derive_seed
    from kdlab.tune.study import SAMPLERS, quiet_optuna

    quiet_optuna()
    params = parse_space(PARALLEL_SPACE)
    spec = TuneSpec(base={}, recipe={}, space=PARALLEL_SPACE, trials=trials, startup_trials=trials)

    def draws(seed: int, worker: int, before: int) -> list[float]:
        sampler = SAMPLERS.get("tpe")(spec, derive_seed(seed, "sampler", worker, before) % 2**32)
        study = optuna.create_study(sampler=sampler, direction="maximize")
        return [study.ask({p.key: p.distribution() for p in params}).params["optim.lr"] for _ in range(2)]

    for seed in range(5000):
        if all(draws(seed, worker, before) == [GOOD, BAD] for worker in (0, 1) for before in (0, 1)):
            return seed
    raise AssertionError("no seed found")


def test_two_parallel_workers_share_one_study_prune_and_write_a_ready_recipe(tmp_path, capsys):
    """4 trials by 2 local worker processes in one study; the region of the space where the student cannot learn
    (lr 1e-6) is pruned by the median pruner; best.yaml is a recipe `kdlab train --dry-run` accepts."""
    out = tmp_path / "study"
    seed = _seed_where_each_worker_draws_good_then_bad(4)
    r = run_kdlab("tune", CE, *TINY, "train.epochs=2", *(a for s in PARALLEL_SPACE for a in ("--space", s)),
                  "--trials", "4", "--parallel", "2", "--startup-trials", "4", "--pruner-startup", "1",
                  "--seed", seed, "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    trials = _trials(out)
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials from the one study
    assert {t.user_attrs["run_dir"] for t in trials} == {f"trials/trial-{i:04d}" for i in range(4)}
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert any(t.params["optim.lr"] == BAD for t in pruned), [(t.state, t.params) for t in trials]
    for t in pruned:  # stopped after its checkpoint, resumable: a stopped run, not a finished one
        run = out / t.user_attrs["run_dir"]
        assert not (run / "summary.json").exists() and any((run / "checkpoints").iterdir())
    table = (out / "results.md").read_text()
    assert "4 of 4 trials" in table and "test split was never read" in table and "pruned at epoch 1" in table
    assert all(f"| {t.number} |" in table for t in trials)
    assert (out / "importance.json").is_file()
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["optim"]["lr"] == best.params["optim.lr"] == GOOD
    assert recipe["optim"]["momentum"] == best.params["optim.momentum"]
    capsys.readouterr()
    assert main(["train", out / "best.yaml", "--out", tmp_path / "final", "--dry-run"]) == 0
    assert "dry run ok" in capsys.readouterr().out


def _kill_when_a_trial_is_mid_run(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    """SIGKILL the whole `kdlab tune` process group (with any worker processes) while a trial that has written an
    epoch checkpoint is still running and another trial has finished; returns that trial's folder."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        runs = sorted((out / "trials").glob("trial-*")) if (out / "trials").is_dir() else []
        done = [d for d in runs if (d / "summary.json").exists()]
        mid = [d for d in runs if not (d / "summary.json").exists() and (d / "checkpoints").is_dir()
               and any(p.name.startswith("epoch") for p in (d / "checkpoints").iterdir())]  # fmt: skip
        if done and mid:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return mid[0]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no trial was caught mid-run (exit {proc.poll()}): {proc.stderr.read() if proc.stderr else ''}")


def test_kill_mid_study_then_rerun_resumes_without_duplicated_or_lost_trials(tmp_path, one_thread):
    """SIGKILL of `kdlab tune` (its worker runs in-process) mid-trial; the same command again finishes the study:
    the killed trial is marked FAIL and queued again with the same values and run folder, whose run *resumes* (its
    checkpointed epochs are kept, not retrained); exactly --trials trials count, each with all its epochs once."""
    out = tmp_path / "study"
    args = ["tune", CE, *TINY, "train.epochs=4", "train.batch_size=8", "--space", "optim.lr=log(1e-3,0.3)",
            "--trials", "3", "--pruner", "none", "--out", out]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "kdlab", *map(str, args)], start_new_session=True, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))  # fmt: skip
    mid = _kill_when_a_trial_is_mid_run(proc, out)
    first_rows = (mid / "metrics.jsonl").read_text().splitlines()
    assert first_rows, "the trial caught mid-run had finished an epoch"
    assert main(args) == 0  # the same command again (here in this process)
    trials = _trials(out)
    gone = replaced(trials)
    assert gone and all(trials[n].state == TrialState.FAIL for n in gone)
    live = counted(trials)
    assert len(live) == 3 and all(t.state == TrialState.COMPLETE for t in live)
    runs = [t.user_attrs["run_dir"] for t in live]
    assert len(set(runs)) == 3  # no run folder shared, none lost
    for t in live:
        if "retry_of" in t.user_attrs:  # same values, same folder as the killed trial
            old = trials[t.user_attrs["retry_of"]]
            assert t.params == old.params and t.user_attrs["run_dir"] == old.user_attrs["run_dir"]
        rows = (out / t.user_attrs["run_dir"] / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["epoch"] for x in rows] == [1, 2, 3, 4]
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
    resumed = (mid / "metrics.jsonl").read_text().splitlines()
    assert resumed[0] == first_rows[0]  # epoch 1 (checkpointed before the kill) kept as it was: not run again

    def numbers(row):  # an epoch re-run after the kill (its row written, its checkpoint not) has other timings only
        return {k: v for k, v in json.loads(row).items() if k not in ("epoch_time_s", "images_per_s")}

    assert [numbers(r) for r in resumed[: len(first_rows)]] == [numbers(r) for r in first_rows]
    assert "interrupted (queued again)" in (out / "results.md").read_text()


def test_slurm_not_installed_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    out = tmp_path / "study"
    code = main(["tune", CE, "--space", "optim.lr=log(1e-3,1)", "--trials", "2", "--parallel", "2",
                 "--launcher", "slurm", "--out", out])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Slurm is not installed here" in err[0], err
    assert not out.exists()


def test_trials_that_cannot_run_fail_with_their_error_and_three_in_a_row_stop(tmp_path, capsys, one_thread):
    out = tmp_path / "study"
    code = main(["tune", KD, f"teacher.checkpoint={tmp_path / 'missing'}", *TINY, "--space",
                 "method.temperature=log(1,16)", "--trials", "5", "--out", out])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("kdlab: error: the study in") and "3 trials in a row failed" in err[-1]
    assert "checkpoint not found" in err[-1] and "rerun the same command" in err[-1]
    trials = _trials(out)
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert all("checkpoint not found" in t.user_attrs["error"] for t in trials)
    assert "3 of 5 trials: 3 fail" in (out / "results.md").read_text()


def test_a_rerun_waits_for_workers_an_earlier_launch_left_running(tmp_path, monkeypatch):
    """A killed `kdlab tune` leaves its local workers (or queued Slurm jobs) working: the rerun counts them from the
    launch records, starts none of their names again, and reports only once they have ended."""
    from kdlab.launch import LAUNCH_DIR
    from kdlab.launch import records
    from kdlab.tune.search import _wait_for, earlier_workers

    folder = tmp_path / LAUNCH_DIR
    import threading

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    threading.Thread(target=alive.wait, daemon=True).start()  # reaped when it ends, as init reaps an orphan
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name, pid in (("tune-worker-0", alive.pid), ("tune-worker-1", gone.pid)):
        records.record_submission(folder, "local", name, tmp_path / f"{name}.log", [], None)
        records.started(folder, name, pid)
    records.record_submission(folder, "local", "tune-worker-2", tmp_path / "w2.log", [], None)  # never started
    assert earlier_workers(tmp_path) == {"tune-worker-0"}
    monkeypatch.setenv("KDLAB_SLURM_POLL_S", "0.1")
    lines: list[str] = []
    t0 = time.monotonic()
    _wait_for(tmp_path, {"tune-worker-0"}, lines.append)
    assert alive.poll() is not None and time.monotonic() - t0 < 30
    assert lines == ["tune: waiting for the earlier workers tune-worker-0"]
    assert earlier_workers(tmp_path) == set()
