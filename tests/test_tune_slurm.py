"""kdlab tune with 2 Slurm workers (issue 20 §5) on the one-node cluster of scripts/slurm/start.sh: N trials in one
study, a bad region pruned. Skips, with the reason, where that cluster cannot start (not root, no slurm-wlm)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO, run_kdlab

pytest.importorskip("optuna")
pytest.importorskip("submitit")

from optuna.trial import TrialState  # noqa: E402
from test_tune import BAD, CE, PARALLEL_SPACE, TINY, _seed_where_each_worker_draws_good_then_bad, _trials  # noqa: E402


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """Start (or reuse) the test cluster; its SLURM_CONF."""
    try:
        r = subprocess.run(["bash", str(REPO / "scripts" / "slurm" / "start.sh")], capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"the Slurm test cluster did not start: {err}")
    line = next((x for x in r.stdout.splitlines() if x.startswith("export SLURM_CONF=")), None)
    if r.returncode != 0 or line is None:
        pytest.skip(f"the Slurm test cluster did not start: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return line.split("=", 1)[1].strip().strip("'\"")


@pytest.mark.slow
def test_two_slurm_workers_complete_the_study_and_prune(tmp_path, slurm_conf, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    monkeypatch.setenv("KDLAB_SLURM_POLL_S", "1")
    out = tmp_path / "study"
    seed = _seed_where_each_worker_draws_good_then_bad(4)
    r = run_kdlab("tune", CE, *TINY, "train.epochs=2", *(a for s in PARALLEL_SPACE for a in ("--space", s)),
                  "--trials", "4", "--parallel", "2", "--launcher", "slurm", "--startup-trials", "4",
                  "--pruner-startup", "1", "--seed", seed, "--out", out, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2 slurm workers (jobs " in r.stderr
    trials = _trials(out)
    assert len(trials) == 4 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # two jobs, one study
    assert any(t.state == TrialState.PRUNED and t.params["optim.lr"] == BAD for t in trials)
    assert (out / "best.yaml").is_file() and all((out / "logs" / f"worker-{i}.log").is_file() for i in (0, 1))


def test_sbatch_refusing_the_workers_request_is_one_line_nothing_written(tmp_path, slurm_conf, monkeypatch, capsys):
    from kdlab.cli import main

    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    out = tmp_path / "study"
    code = main(["tune", CE, "launcher.partition=nosuchpartition", "--space", "optim.lr=log(1e-3,1)", "--trials", "2",
                 "--parallel", "2", "--launcher", "slurm", "--out", out])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sbatch refused the request" in err[0], err
    assert not out.exists()
