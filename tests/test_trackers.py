"""Trackers (TensorBoard, wandb offline, MLflow file store) mirror metrics.jsonl; missing packages fail in one line;
a tracker failing at any point is one warning line and the run goes on (issue 19 §6)."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest

from conftest import CONFIGS, SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}


def _train(out: Path, *overrides: str) -> list[dict]:
    from kdlab.config import load_config
    from kdlab.engine import run

    cfg = load_config(CONFIGS / "mnist1d" / "student_ce.yaml", SMALL + ["train.epochs=2", *overrides])
    run(cfg, out)
    return _metrics(out)


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _train(tmp_path / "run", "logging.tensorboard=true", "instruments=[logit_stats]")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == set(_numbers(rows[0])) and {"train_loss", "lr", "test_acc"} <= tags
    assert any(t.startswith("logit") for t in tags), tags  # the instrument's scalars are mirrored too
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["epoch"] for r in rows]
        assert [e.value for e in events] == pytest.approx([_numbers(r)[tag] for r in rows], rel=1e-6, abs=1e-6)


def _wandb_history(run_file: str) -> list[dict]:
    """History records of an offline ``.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, out = Path(run_file).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_offline_mirrors_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    rows = _train(tmp_path / "run", "logging.wandb={project: kdlab-test, mode: offline}")
    files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1
    history = _wandb_history(files[0])
    assert [h["_step"] for h in history] == [r["epoch"] for r in rows]
    for h, r in zip(history, rows):
        for k, v in _numbers(r).items():
            assert h[k] == pytest.approx(v, rel=1e-6), k


def test_mlflow_file_store_mirrors_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    uri = (tmp_path / "mlruns").as_uri()
    rows = _train(tmp_path / "run", f"logging.mlflow={{tracking_uri: '{uri}', experiment: kd}}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("kd").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method.name"] == "ce"
    for key, value in _numbers(rows[-1]).items():
        hist = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in hist] == [r["epoch"] for r in rows]
        assert hist[-1].value == pytest.approx(value, rel=1e-6), key


def test_missing_tracker_package_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from kdlab.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"logging.wandb needs the 'wandb' package: pip install 'kdlab\[trackers\]'"):
        _train(tmp_path / "run", "logging.wandb={project: p}")
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_bad_logging_config_is_one_line(tmp_path: Path) -> None:
    from kdlab.config import load_config
    from kdlab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"logging.wandb.mode"):
        load_config(CONFIGS / "mnist1d" / "student_ce.yaml", ["logging.wandb={project: p, mode: cloud}"])
    with pytest.raises(ConfigError, match=r"unknown key 'logging.tensorbord'.*tensorboard"):
        load_config(CONFIGS / "mnist1d" / "student_ce.yaml", ["logging.tensorbord=true"])


def test_tensorboard_after_resume_has_each_epoch_once(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdlab.cli import main

    out = tmp_path / "run"
    args = [str(CONFIGS / "mnist1d" / "student_ce.yaml"), "--out", str(out), "--quiet", *SMALL, "logging.tensorboard=true"]
    assert main(["train", *args, "train.epochs=2"]) == 0
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as stale:  # an epoch 3 that logged, then died before its checkpoint
        stale.add_scalar("train_loss", 123.0, global_step=3)
    assert main(["train", "--resume", "--out", str(out), "--quiet", "train.epochs=3"]) == 0
    rows = _metrics(out)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == [1, 2, 3] == [r["epoch"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)


def test_tracker_that_cannot_start_is_one_warning_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setattr("mlflow.tracking.MlflowClient.__init__", lambda self, **kw: (_ for _ in ()).throw(
        RuntimeError("cannot reach the tracking server\nsecond line")))  # fmt: skip
    rows = _train(tmp_path / "run", "logging.mlflow={tracking_uri: 'http://127.0.0.1:9'}")
    assert [r["epoch"] for r in rows] == [1, 2] and (tmp_path / "run" / "summary.json").is_file()
    assert capsys.readouterr().err.splitlines() == [
        "kdlab: warning: logging.mlflow could not start (RuntimeError: cannot reach the tracking server); the run "
        "goes on without it (metrics.jsonl is the record)"
    ]


def _cli_train(out: Path, *overrides: str) -> int:
    from kdlab.cli import main

    return main(["train", str(CONFIGS / "mnist1d" / "student_ce.yaml"), "--out", str(out), "--quiet", *SMALL,
                 "train.epochs=3", *overrides])  # fmt: skip


def test_tensorboard_folder_removed_mid_run_is_one_warning_exit_0(tmp_path: Path, monkeypatch, capsys) -> None:
    """The real TensorBoard writer, its folder deleted during epoch 2: its thread and its flush fail; that is one
    warning line (no traceback from the writer thread), every epoch still runs and metrics.jsonl holds them all."""
    pytest.importorskip("tensorboard")
    import shutil

    from kdlab.engine.trainer import Trainer

    out = tmp_path / "run"
    real = Trainer.evaluate
    calls = []

    def evaluate(self, split="test"):
        calls.append(split)
        if len(calls) == 2:  # epoch 2's evaluation, before its row is logged
            shutil.rmtree(out / "tensorboard")
        return real(self, split)

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    import threading

    hook = threading.excepthook
    assert _cli_train(out, "logging.tensorboard=true") == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("kdlab: warning: logging.tensorboard failed (FileNotFoundError: "), err
    assert err[0].endswith("the run goes on without it (metrics.jsonl is the record)")
    assert [r["epoch"] for r in _metrics(out)] == [1, 2, 3] and (out / "summary.json").is_file()
    assert threading.excepthook is hook  # the writer thread's hook is gone with the writer


def test_mlflow_raising_mid_run_is_one_warning_exit_0(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), **kw):
        if metrics:
            raise ConnectionError("tracking server went away")
        return real(self, run_id, metrics=metrics, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    uri = (tmp_path / "mlruns").as_uri()
    assert _cli_train(tmp_path / "run", f"logging.mlflow={{tracking_uri: '{uri}', experiment: kd}}") == 0
    assert capsys.readouterr().err.splitlines() == [
        "kdlab: warning: logging.mlflow failed (ConnectionError: tracking server went away); the run goes on "
        "without it (metrics.jsonl is the record)"
    ]
    assert [r["epoch"] for r in _metrics(tmp_path / "run")] == [1, 2, 3]
