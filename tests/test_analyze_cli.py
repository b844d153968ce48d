"""``kdlab analyze`` and ``kdlab report`` end to end on tiny MNIST-1D runs (in-process CLI)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from kdlab.cli import main
from kdlab.engine import checkpoint as ck
from kdlab.models import build

FULL = ["--tsne-samples", "30", "--init-seeds", "3", "--quiet"]
FAST = ["--tsne-samples", "0", "--init-seeds", "0", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    common = [f"data.root={root / 'cache'}", "data.num_samples=400", "data.train_split=0.75", "train.epochs=4",
              "train.batch_size=50", "schedule.name=constant"]  # fmt: skip
    teacher = root / "teacher"
    assert main(["train", "configs/mnist1d/student_ce.yaml", *common, "--out", str(teacher), "--quiet"]) == 0
    kd = root / "kd"
    assert main([
        "distill", "configs/mnist1d/student_kd.yaml", *common, "teacher.name=mnist1d_mlp",
        f"teacher.checkpoint={teacher}", "instruments=[alignment,logit_stats]", "--out", str(kd), "--quiet",
    ]) == 0  # fmt: skip
    ce = root / "ce"
    assert main(["train", "configs/mnist1d/student_ce.yaml", *common, "seed=1", "--out", str(ce), "--quiet"]) == 0
    return {"root": root, "teacher": teacher, "kd": kd, "ce": ce}


def test_analyze_writes_figures_and_numbers(runs, capsys):
    kd = runs["kd"]
    assert main(["analyze", str(kd), *FULL]) == 0
    assert "Pearson r(μ, training loss)" in capsys.readouterr().out
    summary = json.loads((kd / "analysis" / "summary.json").read_text())
    n = summary["num_samples"]
    assert n == 300 and summary["split"] == "train" and summary["teacher"]["name"] == "mnist1d_mlp"
    for name, fig in summary["figures"].items():
        png = kd / "analysis" / fig["file"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    expected = {"logit_sum_hist", "logit_mean_std_hist2d", "logit_gap_heatmap", "logit_distance_pdf",
                "feature_norm_pdf", "template_projection", "tsne", "alignment", "epoch_logit_stats", "theory_limits"}  # fmt: skip
    assert set(summary["figures"]) == expected
    figs = summary["figures"]
    for who in ("student", "teacher"):
        assert sum(figs["logit_sum_hist"][who]["counts"]) == n
        assert np.sum(figs["logit_mean_std_hist2d"][who]["counts"]) == n
        assert sum(figs["feature_norm_pdf"][who]["counts"]) == n
    assert sum(figs["logit_distance_pdf"]["counts"]) == n
    assert len(figs["template_projection"]["student"]["coords"]) == sum(
        figs["template_projection"]["student"]["labels"].count(c) for c in (0, 1, 2))
    assert np.asarray(figs["logit_gap_heatmap"]["raw"]["matrix"]).shape == (10, 10)

    # μ against the weights by hand; Pearson r against numpy on metrics.jsonl
    student, teacher = build("mnist1d_mlp", num_classes=10), build("mnist1d_mlp", num_classes=10)
    student.load_state_dict(ck.load_weights_file(kd / "model.safetensors"))
    teacher.load_state_dict(ck.load_weights_file(runs["teacher"] / "model.safetensors"))
    mu = (teacher.fc.weight.double() - student.fc.weight.double()).norm().item()
    al = summary["alignment"]
    assert al["final_mu"] == pytest.approx(mu, rel=1e-9)
    rows = [json.loads(line) for line in (kd / "metrics.jsonl").read_text().splitlines()]
    assert al["mu"][-1] == pytest.approx(mu, rel=1e-5)
    r = np.corrcoef([r["align_mu"] for r in rows], [r["train_loss"] for r in rows])[0, 1]
    assert al["pearson_mu_loss"]["r"] == pytest.approx(r, abs=1e-9) and al["pearson_mu_loss"]["n"] == 4

    # student statistics against a direct forward pass on the training split
    from kdlab.config import load_config
    from kdlab.data import build_dataset

    data = build_dataset(load_config(kd / "config.yaml").data)
    with torch.no_grad():
        z = student.eval()(data.train.x).double()
    st = summary["logit_stats"]["student"]
    assert st["sum"]["mean"] == pytest.approx(z.sum(1).mean().item(), rel=1e-4, abs=1e-6)
    assert st["range"]["max"] == pytest.approx((z.max(1).values - z.min(1).values).max().item(), rel=1e-5)
    assert summary["accuracy"]["student"] == pytest.approx(100 * (z.argmax(1) == data.train.y).double().mean().item())
    assert summary["init_logit_mean"]["student"]["seeds"] == 3
    assert summary["theory"]["zero_mean_gradient"]["holds"] is True


def test_analyze_refuses_to_overwrite_and_overwrites_when_asked(runs, capsys):
    kd = runs["kd"]
    if not (kd / "analysis").exists():
        assert main(["analyze", str(kd), *FAST]) == 0
    summary = kd / "analysis" / "summary.json"
    before = summary.read_bytes()
    mtime = summary.stat().st_mtime_ns
    assert main(["analyze", str(kd), *FAST]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert summary.read_bytes() == before and summary.stat().st_mtime_ns == mtime
    (kd / ".analysis.tmp-999999999").mkdir()  # left by an analysis that died
    assert main(["analyze", str(kd), "--overwrite", "--split", "test", "--max-samples", "50", *FAST]) == 0
    s = json.loads(summary.read_text())
    assert s["split"] == "test" and s["num_samples"] == 50
    assert not list(kd.glob(".analysis.tmp-*"))


def test_analyze_ce_run_with_and_without_teacher(runs, capsys):
    ce = runs["ce"]
    # a .safetensors teacher with no way to know its architecture
    assert main(["analyze", str(ce), "--teacher", str(runs["teacher"] / "model.safetensors"), *FAST]) == 2
    assert "--teacher-arch" in capsys.readouterr().err
    assert not (ce / "analysis").exists()
    assert main(["analyze", str(ce), "--no-teacher", *FAST]) == 0
    s = json.loads((ce / "analysis" / "summary.json").read_text())
    assert s["teacher"] is None and "teacher" not in s["logit_stats"]
    assert "logit_distance_pdf" in s["skipped"] and "alignment" in s["skipped"]
    assert main([
        "analyze", str(ce), "--teacher", str(runs["teacher"] / "model.safetensors"), "--teacher-arch", "mnist1d_mlp",
        "--overwrite", *FAST,
    ]) == 0  # fmt: skip
    s = json.loads((ce / "analysis" / "summary.json").read_text())
    assert s["teacher"]["name"] == "mnist1d_mlp" and s["alignment"]["final_mu"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["analyze", "{root}/nowhere"], "not a kdlab run directory"),
        (["analyze", "{kd}", "--classes", "0,1", "--overwrite"], "3 distinct class indices"),
        (["analyze", "{kd}", "--classes", "0,1,99", "--overwrite"], "3 distinct class indices"),
        (["analyze", "{kd}", "--teacher", "{root}/missing.safetensors", "--overwrite"], "checkpoint not found"),
        (["analyze", "{kd}", "--teacher", "{teacher}", "--no-teacher", "--overwrite"], "exclude each other"),
        (["analyze", "{kd}", "--device", "gpu", "--overwrite"], "device must be"),
        (["report", "{root}/missing", "--out", "{root}/r.html"], "no such run or folder"),
        (["report", "{kd}", "--out", "{root}/report.txt"], "must name an .html file"),
    ],
)
def test_user_errors_are_one_line(runs, capsys, args, message):
    fmt = {k: str(v) for k, v in runs.items()}
    argv = [a.format(**fmt) for a in args]
    if argv[0] == "analyze":
        argv += FAST
    before = sorted(p.name for p in runs["kd"].iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert sorted(p.name for p in runs["kd"].iterdir()) == before


def test_report_is_self_contained_html(runs, capsys):
    for name in ("kd", "ce"):
        if not (runs[name] / "analysis").exists():
            assert main(["analyze", str(runs[name]), *FAST]) == 0
    out = runs["root"] / "report.html"
    assert main(["report", str(runs["kd"]), str(runs["ce"]), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("<!doctype html>") and text.rstrip().endswith("</html>")
    imgs = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert imgs and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert not re.search(r'(src|href)="(?!data:)', text)  # nothing outside the page
    assert "<table>" in text and "r(μ, loss)" in text
    from kdlab.instruments.report import comparison_rows, load_summary

    summaries = [load_summary(runs["kd"]), load_summary(runs["ce"])]
    rows = comparison_rows(summaries)
    assert rows[0]["logit sum std"] == summaries[0]["logit_stats"]["student"]["sum"]["std"]
    assert rows[0]["r(μ, loss)"] == summaries[0]["alignment"]["pearson_mu_loss"]["r"]
    assert f"<td>{rows[0]['logit sum std']:.4g}</td>" in text
    assert main(["report", str(runs["kd"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["report", str(runs["kd"]), "--out", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("<!doctype html>")


def test_analyze_with_an_ensemble_teacher(runs):
    """An ensemble teacher averages logits and has no penultimate feature: logit figures only for it."""
    root, teacher = runs["root"], runs["teacher"]
    ens = root / "ens"
    assert main([
        "distill", "configs/mnist1d/student_kd.yaml", f"data.root={root / 'cache'}", "data.num_samples=400",
        "data.train_split=0.75", "train.epochs=2", "train.batch_size=50", "teacher.name=mnist1d_mlp",
        f"teacher.checkpoint={teacher}", f"teacher.ensemble=[{{name: mnist1d_mlp, checkpoint: {runs['ce']}}}]",
        "instruments=[logit_stats]", "--out", str(ens), "--quiet",
    ]) == 0  # fmt: skip
    assert main(["analyze", str(ens), *FAST]) == 0
    s = json.loads((ens / "analysis" / "summary.json").read_text())
    assert "ensemble" in s["teacher"]["name"] and "teacher_features" in s["skipped"]
    assert "teacher" in s["logit_stats"] and "teacher" not in s["figures"]["feature_norm_pdf"]
    assert "logit_distance_pdf" in s["figures"] and "no final linear classifier" in s["skipped"]["alignment"]


def test_report_puts_our_accuracy_next_to_the_papers_number(tmp_path, capsys):
    """Runs that were never analysed still get a row: mean ± std over seeds, the paper's number and Δ."""
    from conftest import CONFIGS, SMALL

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        assert main(["train", str(CONFIGS / "mnist1d" / "student_ce.yaml"), *SMALL, f"seed={seed}",
                     "meta.paper_top1=70.5", "meta.paper=made-up table", "--out", str(sweep / f"s{seed}")]) == 0
    out = tmp_path / "r.html"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    text = out.read_text()
    assert "Accuracy, ours vs the papers" in text and "70.50" in text and "made-up table" in text
    accs = [json.loads((sweep / f"s{s}" / "summary.json").read_text())["best_test_acc"] for s in (0, 1)]
    assert f"{max(accs) - 70.5:+.2f}" in text or f"{sum(accs) / 2 - 70.5:+.2f}" in text
