"""The pure pieces of the benchmark (benchmarks/): FLOP counting, rates, ratios, report, and the
report's JSON keys against a recorded run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from benchmarks import probes, settings
from benchmarks import report as bench_report


def test_flop_counter_matches_hand_count_for_a_tiny_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)  # no input gradient: the first layer has no input-grad matmul

    def step():
        mlp(x).sum().backward()

    # forward 2*B*(4*3 + 3*2) = 180; backward: layer 2 weight + input grad 2*60, layer 1 weight 120
    assert probes.count_flops(step) == 180 + 60 + 60 + 120 == 420
    assert probes.mlp_train_flops(4, [3, 2], 5, input_grad=False) == 420
    # with an input gradient the first layer adds its input-grad matmul: 2*5*4*3 = 120
    xg = torch.randn(5, 4, requires_grad=True)
    assert probes.count_flops(lambda: mlp(xg).sum().backward()) == 540
    assert probes.mlp_train_flops(4, [3, 2], 5, input_grad=True) == 540


def test_forward_only_flops_are_two_per_mac():
    lin = nn.Linear(7, 11)
    with torch.no_grad():
        assert probes.count_flops(lambda: lin(torch.randn(13, 7))) == 2 * 13 * 7 * 11


def test_tf4ctr_hand_count():
    # ser, d=16, 39 fields: MLP_s 312->400->400->1, MLP_c 624->400->400->400->1, all x3 (fwd + 2 bwd)
    macs = 312 * 400 + 400 * 400 + 400 + 624 * 400 + 2 * 400 * 400 + 400
    assert probes.tf4ctr_train_flops_per_sample(39, 16, [400, 400], [400, 400, 400]) == 6 * macs == 5_131_200


def test_model_flops_counted_through_the_real_model_equal_the_hand_count():
    from tf4ctr_dist.config import ModelConfig

    cfg = {**settings.model_cfg(), "easy_hidden_units": [8, 8], "hard_hidden_units": [8, 8, 8], "embedding_dim": 4}
    got = probes.model_flops(cfg, dict(settings.LOSS), fields=5, batch=16)
    assert got["train_per_sample"] == probes.tf4ctr_train_flops_per_sample(5, 4, [8, 8], [8, 8, 8])
    fwd_macs = (10 * 8 + 8 * 8 + 8) + (20 * 8 + 8 * 8 * 2 + 8)
    assert got["forward_per_sample"] == 2 * fwd_macs
    assert ModelConfig(**cfg).ssem == "ser"


def test_split_windows():
    assert bench_report.split_windows(100, 5) == (5, 20)
    assert bench_report.split_windows(3, 5) == (3, 1)
    assert bench_report.split_windows(0, 5) == (1, 1)
    assert bench_report.split_windows(21, 5) == (5, 4)


def test_window_rates_use_all_samples_and_the_slowest_rank():
    rank0 = [(2048, 1.0), (2048, 0.5)]
    rank1 = [(2048, 2.0), (2048, 0.5)]
    assert bench_report.window_rates([rank0, rank1]) == [2048.0, 8192.0]
    summary = bench_report.summarize_rates([10.0, 30.0, 20.0])
    assert summary["samples_per_s"] == 20.0 and summary["min"] == 10.0 and summary["spread"] == 1.0


def test_ratio_handles_missing_values():
    assert bench_report.ratio(6.0, 2.0) == 3.0
    assert bench_report.ratio(None, 2.0) is None
    assert bench_report.ratio(1.0, 0.0) is None
    assert bench_report.ratio(1.0, None) is None


def test_derive_ratios():
    d = bench_report.derive(
        train_1w=30_000.0, train_2w=40_000.0, reference=5_000.0, flops_per_sample=5e6, matmul_flops=1e11,
        ingest_1w=600_000.0, ingest_2w=500_000.0, ingest_s3_1w=90_000.0, rss_small=1e9, rss_large=1.1e9,
        train_dp_adam=10_000.0,
    )
    assert d["ratio_vs_reference"] == pytest.approx(6.0)
    assert d["ratio_vs_reference_2w"] == pytest.approx(8.0)
    assert d["ratio_vs_reference_dp_adam"] == pytest.approx(2.0)
    assert d["roofline_share"] == pytest.approx(30_000 * 5e6 / 1e11)  # 1.5: over the peak on purpose
    assert d["reference_roofline_share"] == pytest.approx(0.25)
    assert d["ingest_vs_step"] == pytest.approx(20.0)
    assert d["ingest_vs_step_2w"] == pytest.approx(25.0)  # per worker: 500k / (40k / 2)
    assert d["ingest_s3_vs_step"] == pytest.approx(3.0)
    assert d["rss_10m_over_1m"] == pytest.approx(1.1)
    assert d["scaling_2w_over_1w"] == pytest.approx(4 / 3)
    assert d["gpu_samples_per_s"] is None


def _fake_raw() -> dict:
    def train(rate, rss):
        return {"samples_per_s": rate, "spread": 0.05, "rss_peak_bytes": rss, "windows": [rate]}

    return {
        "train": {
            "table_wise_1w": {**train(20_000.0, 1.0e9), "eval": {"samples_per_s": 90_000.0}},
            "table_wise_2w": train(30_000.0, 0.9e9),
            "data_parallel_adam_1w": train(8_000.0, 1.5e9),
            "table_wise_1w_large": train(19_000.0, 1.05e9),
        },
        "reference": {"samples_per_s": 4_000.0, "rss_peak_bytes": 2e9},
        "flops": {"train_per_sample": 5_131_200.0, "forward_per_sample": 1_710_400.0},
        "matmul_cpu": {"flops_per_s": 2e11, "model_shape_flops_per_s": 1.5e11},
        "ingest": {"local_1w": {"samples_per_s": 300_000.0, "batches_per_s": 73.0},
                   "local_2w": {"samples_per_s": 250_000.0, "batches_per_s": 122.0},
                   "s3_1w": {"samples_per_s": 100_000.0, "batches_per_s": 24.0}},
        "gpu": {"matmul": {"tf32": {"flops_per_s": 4e14}},
                "train": {"4096": {"samples_per_s": 5e5, "roofline_share_tf32": 0.006},
                          "65536": {"samples_per_s": 1.2e6, "roofline_share_tf32": 0.015}}},
    }


def test_report_has_the_required_keys_and_serialises():
    report = bench_report.build_report(_fake_raw(), {"cores": 2, "cpu_model": "x", "versions": {}}, {"batch": 4096})
    for key in ("ratio_vs_reference", "roofline_share", "ingest_vs_step", "rss_10m_over_1m", "machine", "config",
                "raw", "targets"):
        assert key in report
    assert report["ratio_vs_reference"] == pytest.approx(5.0)
    assert report["roofline_share"] == pytest.approx(20_000 * 5_131_200 / 2e11)
    assert report["ingest_vs_step"] == pytest.approx(15.0)
    assert report["rss_10m_over_1m"] == pytest.approx(1.05)
    assert report["gpu_samples_per_s"] == 1.2e6
    t = report["targets"]
    assert t["ratio_vs_reference"]["met"] is True
    assert t["roofline_share"]["met"] is True  # 0.513
    assert t["ingest_vs_step"]["met"] is True
    assert t["rss_10m_over_1m"]["met"] is True
    assert t["gpu_samples_per_s"]["met"] is True
    again = json.loads(json.dumps(report))
    assert again["raw"]["train"]["table_wise_1w"]["samples_per_s"] == 20_000.0


def test_report_with_missing_parts_marks_targets_unmeasured():
    raw = _fake_raw()
    del raw["gpu"], raw["train"]["table_wise_1w_large"], raw["ingest"]["s3_1w"]
    report = bench_report.build_report(raw, {}, {})
    assert report["rss_10m_over_1m"] is None and report["targets"]["rss_10m_over_1m"]["met"] is None
    assert report["gpu_samples_per_s"] is None
    text = bench_report.format_table(bench_report.report_rows(report))
    assert "n/a" in text and "ratio ours 1w / reference" in text


def test_table_format():
    report = bench_report.build_report(_fake_raw(), {}, {})
    text = bench_report.format_table(bench_report.report_rows(report))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "value", "unit"]
    assert any("ratio ours 1w / reference" in ln and "5.00" in ln and ln.rstrip().endswith("x") for ln in lines)
    assert any("roofline share ours 1w" in ln and "51.3" in ln for ln in lines)
    assert any(ln.startswith("-- training") for ln in lines)
    assert bench_report.fmt_value(math.pi, "x") == "3.14"
    assert bench_report.fmt_value(None, "x") == "n/a"
    assert bench_report.fmt_value(12345.6, "samples/s") == "12,346"


def test_rss_is_reported_in_bytes():
    r = probes.rss_bytes()
    assert r["rss_peak_bytes"] > 10 * 2**20
    assert r["rss_bytes"] is None or r["rss_bytes"] <= r["rss_peak_bytes"]


def test_pipeline_stage_names_drop_the_batch_number():
    assert bench_report.stage_name("## forward 12 ##") == "forward"
    assert bench_report.stage_name("## copy_batch_to_gpu 3 ##") == "copy_batch_to_gpu"
    assert bench_report.stage_name("## next_batch ##") == "next_batch"


def test_bf16_option_figures_are_extra_keys_next_to_the_fp32_headline():
    raw = _fake_raw()
    raw["train"]["table_wise_1w_bf16"] = {"samples_per_s": 32_000.0, "spread": 0.1, "windows": [32_000.0]}
    raw["matmul_cpu"]["bf16_flops_per_s"] = 8e11
    report = bench_report.build_report(raw, {}, {})
    assert report["ratio_vs_reference"] == pytest.approx(5.0)  # the fp32 default run
    assert report["ratio_vs_reference_bf16"] == pytest.approx(8.0)
    assert report["roofline_share_bf16_vs_fp32_mm"] == pytest.approx(32_000 * 5_131_200 / 2e11)
    assert report["roofline_share_bf16"] == pytest.approx(32_000 * 5_131_200 / 8e11)
    text = bench_report.format_table(bench_report.report_rows(report))
    assert "ratio ours 1w bf16 / reference" in text and "(vs bf16 mm)" in text
    assert "ours 1w bf16" not in bench_report.format_table(bench_report.report_rows(bench_report.build_report(_fake_raw(), {}, {})))


def test_sync_batch_norm_row_is_its_rate_over_the_plain_two_worker_rate():
    raw = _fake_raw()
    raw["train"]["table_wise_2w_sync_bn"] = {"samples_per_s": 24_000.0, "spread": 0.1, "windows": [24_000.0],
                                             "rss_peak_bytes": 0.9e9}
    lines = bench_report.format_table(bench_report.report_rows(bench_report.build_report(raw, {}, {}))).splitlines()
    assert any("ratio ours 2w sync_batch_norm / 2w" in ln and "0.80" in ln for ln in lines)  # 24k / 30k
    plain = bench_report.format_table(bench_report.report_rows(bench_report.build_report(_fake_raw(), {}, {})))
    assert "sync_batch_norm" not in plain


def test_interleaved_rounds_give_per_round_ratios_against_the_reference():
    # 3 rounds of 2 steps of batch 100: (wall s, CPU s) per round and variant
    r = {"rounds": {"reference": [(1.0, 2.0), (2.0, 4.0), (1.0, 2.0)],
                    "default": [(0.5, 1.0), (0.5, 1.0), (0.25, 0.5)],
                    "default_bf16": [(0.25, 0.5), (1.0, 2.0), (0.5, 1.0)],
                    "eager_bn": [(0.5, 1.0), (1.0, 2.0), (0.5, 1.0)]},
         "losses": {"reference": [0.7], "default": [0.6], "default_bf16": [0.65], "eager_bn": [0.6]}}
    s = bench_report.summarize_ab(r, ["reference", "default", "default_bf16", "eager_bn"], per_round=2, batch=100)
    # per-round ratios 2, 4, 4 -> median 4; a ratio of medians would give 400/200 = 2
    assert s["default"]["ratio_vs_base"] == pytest.approx(4.0)
    assert (s["default"]["ratio_vs_base_min"], s["default"]["ratio_vs_base_max"]) == (2.0, 4.0)
    assert s["default"]["samples_per_s"] == pytest.approx(400.0)  # median of 400, 400, 800
    assert s["default_bf16"]["ratio_vs_base"] == pytest.approx(2.0)  # 4, 2, 2
    assert s["default_bf16"]["ratio_vs_previous"] == pytest.approx(0.5)  # vs default: 2, 0.5, 0.5
    assert s["reference"]["ratio_vs_base"] == 1.0
    raw = {**_fake_raw(), "interleaved": {"variants": s}}
    report = bench_report.build_report(raw, {}, {})
    assert report["ratio_vs_reference_interleaved"] == pytest.approx(4.0)
    assert report["ratio_vs_reference_bf16_interleaved"] == pytest.approx(2.0)
    assert report["roofline_share_interleaved"] == pytest.approx(400 * 5_131_200 / 2e11)
    assert report["ratio_vs_reference_eager_bn_interleaved"] == pytest.approx(2.0)  # 2, 2, 2
    assert report["roofline_share_eager_bn_interleaved"] == pytest.approx(400 * 5_131_200 / 2e11)  # median of 400, 200, 400
    assert report["targets"]["ratio_vs_reference_interleaved"]["met"] is True
    assert report["targets"]["ratio_vs_reference_bf16_interleaved"]["met"] is False
    text = bench_report.format_table(bench_report.report_rows(report))
    assert "ratio ours 1w / reference, interleaved" in text and "roofline share ours 1w, interleaved rate" in text


# The last report of the benchmark before it moved out of the package (tf4ctr_dist/bench.py at
# 1996ed6, smoke settings: every CPU section ran), as it wrote it.
RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "2026-12-06T0335-full-sync-bn-kernel.json"


def _key_paths(d: Any, prefix: str = "") -> set[str]:
    """Every dict key as a dotted path (lists are leaves)."""
    out: set[str] = set()
    if isinstance(d, dict):
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.add(path)
            out |= _key_paths(v, path)
    return out


def test_report_builder_keeps_the_recorded_runs_keys_and_figures():
    recorded = json.loads(RECORDED.read_text())
    assert recorded["config"]["sections"] == list(settings.SECTIONS)  # a run of every section
    report = json.loads(json.dumps(bench_report.build_report(recorded["raw"], recorded["machine"], recorded["config"])))
    assert _key_paths(report) == _key_paths(recorded)
    # the derived figures are recomputed from raw, not copied: they must come out the same
    derived = [k for k in recorded if k not in ("targets", "raw", "machine", "config")]
    assert len(derived) == 27 and "ratio_vs_reference_eager_bn_interleaved" in derived
    assert "inference_vs_reference" in derived and "inference_roofline_share" in derived
    for key in derived:
        assert report[key] == (pytest.approx(recorded[key]) if recorded[key] is not None else None), key
    assert report["targets"] == recorded["targets"]
    # every section of the table has rows from that run
    text = bench_report.format_table(bench_report.report_rows(report))
    for line in ("ratio ours 1w, CPU kernel off / reference, interleaved", "S3 (moto), 1 worker share",
                 "1 worker, large dataset", "eval/inference DMP forward (1 worker)",
                 "ratio ours fused fp32 / reference", "inference roofline share, bf16 (vs bf16 mm)"):
        row = next(ln for ln in text.splitlines() if ln.startswith(line))
        assert "n/a" not in row, row
