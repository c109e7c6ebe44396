"""The report: rates from timed windows, the headline ratios, the targets, the printed table.

Pure functions of the raw figures (unit-tested on a recorded run: tests/unit/test_benchmarks.py).
`build_report` makes the JSON that `python -m benchmarks --out` writes; its keys are what earlier
runs recorded (benchmarks/results/), so runs stay comparable.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.settings import TARGETS


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing or den is not positive."""
    if num is None or den is None or den <= 0:
        return None
    return float(num) / float(den)


def split_windows(steps: int, windows: int) -> tuple[int, int]:
    """(number of windows, steps per window) for `steps` timed steps: at least one step each."""
    steps = max(1, int(steps))
    windows = max(1, min(int(windows), steps))
    return windows, steps // windows


def window_rates(per_rank: Sequence[Sequence[tuple[int, float]]]) -> list[float]:
    """Global samples/s per timed window from every rank's [(samples, seconds), ...].

    Ranks step in lock-step (every step all-reduces), so a window's global rate is the samples
    all ranks processed in it divided by the slowest rank's duration.
    """
    if not per_rank:
        return []
    n = min(len(r) for r in per_rank)
    rates = []
    for w in range(n):
        samples = sum(r[w][0] for r in per_rank)
        seconds = max(r[w][1] for r in per_rank)
        rates.append(samples / seconds if seconds > 0 else float("nan"))
    return rates


def summarize_rates(rates: Sequence[float]) -> dict[str, Any]:
    clean = [r for r in rates if r == r]  # drop NaN
    if not clean:
        return {"samples_per_s": None, "windows": list(rates)}
    return {
        "samples_per_s": statistics.median(clean),
        "min": min(clean),
        "max": max(clean),
        "spread": (max(clean) - min(clean)) / statistics.median(clean),
        "windows": [round(r, 1) for r in rates],
    }


def derive(
    *,
    train_1w: float | None,
    train_2w: float | None,
    reference: float | None,
    flops_per_sample: float | None,
    matmul_flops: float | None,
    ingest_1w: float | None,
    ingest_2w: float | None = None,
    ingest_s3_1w: float | None = None,
    rss_small: float | None = None,
    rss_large: float | None = None,
    train_dp_adam: float | None = None,
    gpu_best: float | None = None,
    train_bf16: float | None = None,
    matmul_bf16_flops: float | None = None,
    interleaved: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """The headline ratios from raw figures (samples/s, FLOPs, bytes). None where unmeasured."""
    dense_flops = lambda rate: None if rate is None or flops_per_sample is None else rate * flops_per_sample
    per_worker_2w = None if train_2w is None else train_2w / 2
    return {
        "ratio_vs_reference": ratio(train_1w, reference),
        "ratio_vs_reference_2w": ratio(train_2w, reference),
        "ratio_vs_reference_dp_adam": ratio(train_dp_adam, reference),
        "scaling_2w_over_1w": ratio(train_2w, train_1w),
        "roofline_share": ratio(dense_flops(train_1w), matmul_flops),
        "roofline_share_2w": ratio(dense_flops(train_2w), matmul_flops),
        "reference_roofline_share": ratio(dense_flops(reference), matmul_flops),
        "ingest_vs_step": ratio(ingest_1w, train_1w),
        "ingest_vs_step_2w": ratio(ingest_2w, per_worker_2w),
        "ingest_s3_vs_step": ratio(ingest_s3_1w, train_1w),
        "rss_10m_over_1m": ratio(rss_large, rss_small),
        "gpu_samples_per_s": gpu_best,
        # model.dense_precision=bf16 (an option; the headline figures above are the fp32 default)
        "ratio_vs_reference_bf16": ratio(train_bf16, reference),
        "roofline_share_bf16_vs_fp32_mm": ratio(dense_flops(train_bf16), matmul_flops),
        "roofline_share_bf16": ratio(dense_flops(train_bf16), matmul_bf16_flops),
        # the same ratios measured round by round in one process (section "interleaved")
        "ratio_vs_reference_interleaved": _get(interleaved or {}, "default.ratio_vs_base"),
        "ratio_vs_reference_bf16_interleaved": _get(interleaved or {}, "default_bf16.ratio_vs_base"),
        "roofline_share_interleaved": ratio(dense_flops(_get(interleaved or {}, "default.samples_per_s")), matmul_flops),
        # fp32 without the compiled BatchNorm/ReLU/dropout CPU kernel (TF4CTR_CPU_KERNELS=0)
        "ratio_vs_reference_eager_bn_interleaved": _get(interleaved or {}, "eager_bn.ratio_vs_base"),
        "roofline_share_eager_bn_interleaved": ratio(
            dense_flops(_get(interleaved or {}, "eager_bn.samples_per_s")), matmul_flops),
    }


def check_targets(derived: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for key, (op, threshold, what) in TARGETS.items():
        value = derived.get(key)
        met = None if value is None else (value >= threshold if op == ">=" else value < threshold)
        out[key] = {"target": f"{op} {threshold:g}", "value": value, "met": met, "what": what}
    return out


def stage_name(key: str) -> str:
    """A TorchRec record_function label without its batch number: "## forward 12 ##" -> "forward"."""
    return re.sub(r"\s+\d+$", "", key.strip("# ").strip())


def fmt_value(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if unit == "%":
        return f"{100 * value:.1f}"
    if unit in ("x", "ratio"):
        return f"{value:.2f}"
    if abs(value) >= 1e9:
        return f"{value / 1e9:,.1f} G"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def format_table(rows: Sequence[tuple[str, Any, str]]) -> str:
    """Rows (name, value, unit) -> aligned text; a row with value "" and unit "" is a heading."""
    cells = [(n, fmt_value(v, u) if v != "" else "", u) for n, v, u in rows]
    wn = max([len(c[0]) for c in cells] + [4])
    wv = max([len(c[1]) for c in cells] + [5])
    lines = [f"{'name':<{wn}}  {'value':>{wv}}  unit", "-" * (wn + wv + 12)]
    for name, value, unit in cells:
        lines.append(f"{name:<{wn}}  {value:>{wv}}  {unit}".rstrip() if value else f"-- {name}")
    return "\n".join(lines)


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def build_report(raw: dict[str, Any], machine: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Headline ratios + target checks + raw figures + machine + config (the JSON written)."""
    gpu_rates = [r.get("samples_per_s") for r in (raw.get("gpu", {}) or {}).get("train", {}).values()]
    gpu_rates = [r for r in gpu_rates if r]
    derived = derive(
        train_1w=_get(raw, "train.table_wise_1w.samples_per_s"),
        train_2w=_get(raw, "train.table_wise_2w.samples_per_s"),
        train_dp_adam=_get(raw, "train.data_parallel_adam_1w.samples_per_s"),
        reference=_get(raw, "reference.samples_per_s"),
        flops_per_sample=_get(raw, "flops.train_per_sample"),
        matmul_flops=_get(raw, "matmul_cpu.flops_per_s"),
        ingest_1w=_get(raw, "ingest.local_1w.samples_per_s"),
        ingest_2w=_get(raw, "ingest.local_2w.samples_per_s"),
        ingest_s3_1w=_get(raw, "ingest.s3_1w.samples_per_s"),
        rss_small=_get(raw, "train.table_wise_1w.rss_peak_bytes"),
        rss_large=_get(raw, "train.table_wise_1w_large.rss_peak_bytes"),
        gpu_best=max(gpu_rates) if gpu_rates else None,
        train_bf16=_get(raw, "train.table_wise_1w_bf16.samples_per_s"),
        matmul_bf16_flops=_get(raw, "matmul_cpu.bf16_flops_per_s"),
        interleaved=_get(raw, "interleaved.variants"),
    )
    from benchmarks.inference import inference_figures

    derived.update(inference_figures(raw.get("inference"), _get(raw, "flops.forward_per_sample"),
                                     _get(raw, "matmul_cpu.flops_per_s"), _get(raw, "matmul_cpu.bf16_flops_per_s")))
    return {**derived, "targets": check_targets(derived), "raw": raw, "machine": machine, "config": config}


def report_rows(report: dict[str, Any]) -> list[tuple[str, Any, str]]:
    raw = report["raw"]
    g = lambda p: _get(raw, p)
    rows: list[tuple[str, Any, str]] = [("training (steady state, median of windows)", "", "")]
    for key, label in (
        ("table_wise_1w", "ours 1 worker  table_wise + fused rowwise_adagrad"),
        ("table_wise_1w_bf16", "ours 1 worker  same, dense_precision=bf16"),
        ("table_wise_2w", "ours 2 workers table_wise + fused rowwise_adagrad"),
        ("table_wise_2w_sync_bn", "ours 2 workers same, train.sync_batch_norm"),
        ("data_parallel_adam_1w", "ours 1 worker  data_parallel + Adam (full L2)"),
    ):
        if g(f"train.{key}") is not None:
            rows.append((label, g(f"train.{key}.samples_per_s"), "samples/s"))
            rows.append((f"  {key} window spread (max-min)/median", g(f"train.{key}.spread"), "%"))
    if g("reference") is not None:
        rows.append(("reference (nn.Embedding + dense Adam, 1 process)", g("reference.samples_per_s"), "samples/s"))
    rows.append(("ratio ours 1w / reference", report.get("ratio_vs_reference"), "x"))
    if g("train.table_wise_1w_bf16") is not None:
        rows.append(("ratio ours 1w bf16 / reference", report.get("ratio_vs_reference_bf16"), "x"))
    rows.append(("ratio ours 2w / reference", report.get("ratio_vs_reference_2w"), "x"))
    rows.append(("ratio ours dp-Adam 1w / reference", report.get("ratio_vs_reference_dp_adam"), "x"))
    rows.append(("scaling 2 workers / 1 worker", report.get("scaling_2w_over_1w"), "x"))
    if g("train.table_wise_2w_sync_bn") is not None:
        rows.append(("ratio ours 2w sync_batch_norm / 2w", ratio(g("train.table_wise_2w_sync_bn.samples_per_s"),
                                                                 g("train.table_wise_2w.samples_per_s")), "x"))
    if g("interleaved") is not None:
        rows.append(("interleaved in one process (median of per-round ratios)", "", ""))
        for name, label in (("reference", "reference"), ("default", "ours 1w"), ("default_bf16", "ours 1w bf16"),
                            ("eager_bn", "ours 1w, CPU kernel off")):
            if g(f"interleaved.variants.{name}") is not None:
                rows.append((f"{label} samples/s, interleaved", g(f"interleaved.variants.{name}.samples_per_s"),
                             "samples/s"))
        rows.append(("ratio ours 1w / reference, interleaved", report.get("ratio_vs_reference_interleaved"), "x"))
        rows.append(("ratio ours 1w bf16 / reference, interleaved", report.get("ratio_vs_reference_bf16_interleaved"), "x"))
        if g("interleaved.variants.eager_bn") is not None:
            rows.append(("ratio ours 1w, CPU kernel off / reference, interleaved",
                         report.get("ratio_vs_reference_eager_bn_interleaved"), "x"))
    rows.append(("per CPU-second (load-insensitive diagnostic)", "", ""))
    for key, label in (("table_wise_1w", "ours 1w"), ("table_wise_1w_bf16", "ours 1w bf16"),
                       ("table_wise_2w", "ours 2w (all ranks)"),
                       ("table_wise_2w_sync_bn", "ours 2w sync_batch_norm (all ranks)"),
                       ("data_parallel_adam_1w", "ours dp-Adam 1w")):
        if g(f"train.{key}.samples_per_cpu_s") is not None:
            rows.append((f"{label} samples per CPU-second", g(f"train.{key}.samples_per_cpu_s"), "samples/CPU-s"))
    if g("reference.samples_per_cpu_s") is not None:
        rows.append(("reference samples per CPU-second", g("reference.samples_per_cpu_s"), "samples/CPU-s"))
        rows.append(("ratio ours 1w / reference per CPU-second",
                     ratio(g("train.table_wise_1w.samples_per_cpu_s"), g("reference.samples_per_cpu_s")), "x"))
    rows.append(("roofline", "", ""))
    rows.append(("dense FLOPs per training sample (counted)", g("flops.train_per_sample"), "FLOP"))
    rows.append(("dense FLOPs per inference sample (counted)", g("flops.forward_per_sample"), "FLOP"))
    rows.append(("fp32 matmul 2048^2, all threads (best)", g("matmul_cpu.flops_per_s"), "FLOP/s"))
    rows.append(("fp32 matmul at the model's first-layer shape", g("matmul_cpu.model_shape_flops_per_s"), "FLOP/s"))
    rows.append(("roofline share ours 1w", report.get("roofline_share"), "%"))
    if report.get("roofline_share_interleaved") is not None:
        rows.append(("roofline share ours 1w, interleaved rate", report.get("roofline_share_interleaved"), "%"))
    if report.get("roofline_share_eager_bn_interleaved") is not None:
        rows.append(("roofline share ours 1w, CPU kernel off, interleaved rate",
                     report.get("roofline_share_eager_bn_interleaved"), "%"))
    if g("matmul_cpu.bf16_flops_per_s") is not None:
        rows.append(("bf16 matmul 2048^2, all threads (best)", g("matmul_cpu.bf16_flops_per_s"), "FLOP/s"))
    if g("train.table_wise_1w_bf16") is not None:
        rows.append(("roofline share ours 1w bf16 (vs fp32 mm)", report.get("roofline_share_bf16_vs_fp32_mm"), "%"))
        rows.append(("roofline share ours 1w bf16 (vs bf16 mm)", report.get("roofline_share_bf16"), "%"))
    rows.append(("roofline share ours 2w", report.get("roofline_share_2w"), "%"))
    rows.append(("roofline share reference", report.get("reference_roofline_share"), "%"))
    rows.append(("ingest (ParquetSplitReader alone, one epoch)", "", ""))
    for key, label in (("local_1w", "local, 1 worker share"), ("local_2w", "local, 1 of 2 workers"), ("s3_1w", "S3 (moto), 1 worker share")):
        if g(f"ingest.{key}") is not None:
            rows.append((f"{label}", g(f"ingest.{key}.samples_per_s"), "samples/s"))
            rows.append((f"{label}", g(f"ingest.{key}.batches_per_s"), "batches/s"))
            rows.append((f"{label}, after the first window", g(f"ingest.{key}.after_first_samples_per_s"), "samples/s"))
    rows.append(("ingest / step rate, 1 worker", report.get("ingest_vs_step"), "x"))
    rows.append(("ingest / step rate, 2 workers (per worker)", report.get("ingest_vs_step_2w"), "x"))
    rows.append(("S3 ingest / step rate, 1 worker", report.get("ingest_s3_vs_step"), "x"))
    rows.append(("evaluation", "", ""))
    rows.append(("eval/inference DMP forward (1 worker)", g("train.table_wise_1w.eval.samples_per_s"), "samples/s"))
    from benchmarks.inference import inference_rows

    rows += inference_rows(report, g("inference"))
    rows.append(("memory (peak RSS per worker, training)", "", ""))
    for key, label in (
        ("table_wise_1w", "1 worker, small dataset"),
        ("table_wise_1w_large", "1 worker, large dataset"),
        ("table_wise_2w", "2 workers, small dataset (max rank)"),
        ("table_wise_2w_sync_bn", "2 workers sync_batch_norm, small dataset (max rank)"),
        ("data_parallel_adam_1w", "1 worker dp-Adam, small dataset"),
    ):
        if g(f"train.{key}.rss_peak_bytes") is not None:
            rows.append((label, g(f"train.{key}.rss_peak_bytes") / 2**20, "MiB"))
    if g("reference.rss_peak_bytes") is not None:
        rows.append(("reference process", g("reference.rss_peak_bytes") / 2**20, "MiB"))
    rows.append(("RSS large / small", report.get("rss_10m_over_1m"), "x"))
    gpu = raw.get("gpu")
    if gpu:
        rows.append(("GPU", "", ""))
        for name, v in (gpu.get("matmul") or {}).items():
            rows.append((f"GPU matmul {name}", v.get("flops_per_s"), "FLOP/s"))
        for b, r in (gpu.get("train") or {}).items():
            rows.append((f"GPU train batch {b}", r.get("samples_per_s"), "samples/s"))
            rows.append((f"GPU roofline share batch {b} (vs TF32 mm)", r.get("roofline_share_tf32"), "%"))
            rows.append((f"GPU roofline share batch {b} (vs bf16 mm)", r.get("roofline_share_bf16"), "%"))
        if gpu.get("ingest"):
            rows.append(("ingest at the GPU batch, 1 worker share", gpu["ingest"].get("samples_per_s"), "samples/s"))
    rows.append(("targets", "", ""))
    for key, t in report["targets"].items():
        state = "n/a" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        rows.append((f"{key} {t['target']}", state, ""))
    return rows


def summarize_ab(r: dict, variants: Sequence[str], per_round: int, batch: int) -> dict[str, dict[str, Any]]:
    """Per variant: median samples/s (wall and per CPU-second) over rounds and the medians of the
    per-round ratios against the first variant and against the one listed before it."""
    base = variants[0]
    summary: dict[str, dict[str, Any]] = {}
    for name in variants:
        wall = [per_round * batch / w for w, _ in r["rounds"][name]]
        cpu = [per_round * batch / c for _, c in r["rounds"][name]]
        ratios = [b[0] / w[0] for b, w in zip(r["rounds"][base], r["rounds"][name])]
        cpu_ratios = [b[1] / w[1] for b, w in zip(r["rounds"][base], r["rounds"][name])]
        prev = variants[max(0, variants.index(name) - 1)]
        summary[name] = {"samples_per_s": statistics.median(wall), "samples_per_cpu_s": statistics.median(cpu),
                         "ratio_vs_previous": statistics.median(
                             a[0] / b[0] for a, b in zip(r["rounds"][prev], r["rounds"][name])), "previous": prev,
                         "ratio_vs_base": statistics.median(ratios), "ratio_vs_base_min": min(ratios),
                         "ratio_vs_base_max": max(ratios), "cpu_ratio_vs_base": statistics.median(cpu_ratios),
                         "last_losses": r["losses"][name][-3:]}
    return summary


def train_summary(results: list[dict]) -> dict[str, Any]:
    rates = window_rates([r["windows"] for r in results])
    total_samples = sum(sum(w[0] for w in r["windows"]) for r in results)
    total_s = max(sum(w[1] for w in r["windows"]) for r in results)
    r0 = results[0]
    cpu_s = sum(sum(w[2] for w in r["windows"]) for r in results)
    out = {
        **summarize_rates(rates),
        "overall_samples_per_s": total_samples / total_s if total_s else None,
        "samples_per_cpu_s": total_samples / cpu_s if cpu_s else None,
        "cpu_utilisation": cpu_s / total_s / sum(r["threads"] for r in results) if total_s else None,
        "workers": len(results),
        "local_batch": r0["local_batch"],
        "threads_per_worker": r0["threads"],
        "concurrent_table_backward": r0.get("concurrent_table_backward"),
        "cpu_kernel": r0.get("cpu_kernel"),
        "table_kernel": r0.get("table_kernel"),
        "setup_s": max(r["setup_s"] for r in results),
        "final_loss": r0["final_loss"],
        "rss_peak_bytes": max(r["rss_peak_bytes"] for r in results),
        "rss_peak_bytes_per_rank": [r["rss_peak_bytes"] for r in results],
        "rss_end_bytes_per_rank": [r["rss_bytes"] for r in results],
        "rss_source": r0.get("rss_source"),
        "placement": r0.get("placement"),
        "plan": r0.get("plan"),
    }
    for key in ("eval", "profile"):
        if key in r0:
            out[key] = r0[key]
    return out
