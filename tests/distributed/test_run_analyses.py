"""A 2-rank gloo run writes the per-epoch analyses to metrics.jsonl and TensorBoard events that
tensorboard's own EventAccumulator reads."""

from __future__ import annotations

import json

import pytest

from tests.distributed._launch import run_gloo
from tests.distributed.test_train_worker import _train

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from data_tools.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("analyses")
    url = str(root / "data")
    generate_synthetic(url, rows=6_000, fields=6, scale_vocab=0.02, seed=3, row_group_rows=1_000)
    out = root / "run"
    overrides = [f"data.url={url}", f"out={out}", "cluster.workers=2", "train.batch_size=512",
                 "train.eval_batch_size=2048", "train.epochs=2", "train.monitor=[AUC]", "train.log_every=0",
                 "easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "embedding_dim=4", "ssem=gm", "dfm=wsf",
                 "train.analyses=[buckets,histograms,fusion,test_buckets,grad_norms,telemetry]", "checkpoint.enabled=false"]
    results = run_gloo(_train, 2, overrides, timeout=240)
    return out, results


def test_metrics_jsonl_holds_the_analyses(run_dir):
    out, (r0, _) = run_dir
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    first, second = lines
    a = first["analyses"]
    n_valid = first["valid"]["samples"]
    for split in ("valid", "test"):
        d = a[f"{split}_difficulty"]
        assert d["positive"]["well"] + d["positive"]["poorly"] + d["positive"]["misclassified"] == d["positive"]["n"]
    assert a["valid_difficulty"]["positive"]["n"] + a["valid_difficulty"]["negative"]["n"] == n_valid
    assert a["test"]["samples"] == r0["test"]["samples"]
    h = a["valid_histogram"]
    assert sum(h["positive"]) == a["valid_difficulty"]["positive"]["n"]
    assert sum(h["negative"]) == a["valid_difficulty"]["negative"]["n"]
    # Train histogram: every training sample of the epoch, both ranks together.
    assert sum(a["train_histogram"]["positive"]) + sum(a["train_histogram"]["negative"]) == first["train_samples"]
    # Grad norms: one per step of the first epoch only (rank 0's steps; 4800 rows / 512 per step).
    steps = len(a["grad_norms"]["simple"])
    assert steps == len(a["grad_norms"]["complex"]) and 9 <= steps <= 10
    assert all(x > 0 for x in a["grad_norms"]["simple"])
    assert "grad_norms" not in second["analyses"]
    gate = a["fusion"]["ssem_gate"]
    assert 0.0 < gate["mean"][0] < 1.0 and gate["std"][0] > 0.0
    assert set(a["fusion"]["wsf"]) == {"w_s", "w_c"} and a["fusion"]["wsf"]["w_s"] != 0.5
    assert first["valid_seconds"] > 0 and r0["timing"]["first_epoch_train_seconds"] == first["train_seconds"]
    # Telemetry (TF loss, c 0.7, gamma 1): a window per step here (10 steps < 10 windows), both ranks.
    for record in (first, second):
        windows = record["analyses"]["telemetry"]
        assert [w["step"] for w in windows] == list(range(1, len(windows) + 1)) and 9 <= len(windows) <= 10
        assert sum(w["samples"] for w in windows) == record["train_samples"]
        for w in windows:
            assert all(0.0 <= w[k] <= 1.0 for k in ("easy_share_fused", "easy_share_simple", "easy_share_complex"))
            assert 0.7 <= w["mean_weight_simple"] <= 1.7 and 0.3 <= w["mean_weight_complex"] <= 1.3
    # Training makes more samples easy: the last window of epoch 2 beyond the first of epoch 1.
    assert (second["analyses"]["telemetry"][-1]["easy_share_fused"]
            > first["analyses"]["telemetry"][0]["easy_share_fused"])


def test_tensorboard_event_files_read_back(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, (r0, _) = run_dir
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"valid/AUC", "valid/logloss", "epoch/train_loss", "epoch/lr", "test/AUC", "train/loss",
            "fusion/ssem_gate_0", "fusion/wsf/w_s", "grad_norm_first_epoch/simple",
            "difficulty_valid/positive/well_frac", "telemetry/easy_share_simple",
            "telemetry/mean_weight_complex"} <= set(tags["scalars"])
    assert {"predictions_valid/positive", "predictions_train/negative"} <= set(tags["histograms"])
    auc = acc.Scalars("valid/AUC")
    assert [e.step for e in auc] == [1, 2]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in auc] == pytest.approx([r["valid"]["AUC"] for r in lines], rel=1e-6)
    hist = acc.Histograms("predictions_valid/positive")[0].histogram_value
    assert sum(hist.bucket) == sum(lines[0]["analyses"]["valid_histogram"]["positive"])


def test_report_writes_the_plots(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tf4ctr_dist.cli import main

    out, _ = run_dir
    report = tmp_path / "report"
    assert main(["report", str(out), str(out), "--out", str(report)]) == 0
    pngs = sorted(p.relative_to(report).as_posix() for p in report.rglob("*.png"))
    assert pngs == ["1-run/difficulty.png", "1-run/fusion.png", "1-run/grad_norms.png", "1-run/histograms.png",
                    "1-run/telemetry.png", "2-run/difficulty.png", "2-run/fusion.png", "2-run/grad_norms.png",
                    "2-run/histograms.png", "2-run/telemetry.png", "curves.png", "tf_loss.png"]
    for p in report.rglob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    summary = (report / "summary.md").read_text()
    assert "| 1-run | 2 |" in summary and "![loss and AUC](curves.png)" in summary
    # A folder that is not a run: one line naming it, exit 1.
    assert main(["report", str(tmp_path / "nothing")]) == 1
    assert "nothing: no metrics.jsonl" in capsys.readouterr().err
