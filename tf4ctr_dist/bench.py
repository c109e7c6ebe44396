"""Benchmark: the distributed TF4CTR training path against the plain reference and the machine.

`python jobs/benchmark.py --help`. Everything runs in ONE invocation, side by side:

  1. training samples/s of TF4CTRTrain through the real path (meta-built model -> resolve_placement
     -> shard_model -> build_optimizer -> TrainPipelineSparseDist, fed by ParquetSplitReader over
     a synthetic Criteo-shaped dataset), 1 and 2 gloo workers (table_wise + fused rowwise Adagrad),
     plus data_parallel + Adam on 1 worker;
  2. the plain single-process reference (ReferenceTF4CTR + ReferenceStep) on the same vocabularies
     and batch, all cores;
  3. the roofline: measured dense fp32 matmul FLOP/s vs. the model's counted FLOPs per sample;
  4. ingest: ParquetSplitReader alone (local path and a local moto S3 server) vs. the step rate;
  5. evaluation throughput (DMP forward, eval mode);
  6. peak RSS per worker on a small and a large dataset (the reader streams: RSS must not grow);
  7. with --gpu: the same training path on CUDA/nccl with fbgemm's fused Adam at two batch sizes,
     as a share of the GPU's measured dense matmul roofline.

Every measurement runs in its own spawned process (torch threads = cores // workers), timed only
after a warm-up, as the median of several timed windows. Prints one table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from tf4ctr_dist.distributed.spawn import free_port, spawn

# ---- settings --------------------------------------------------------------------------------

FIELDS = 39
LOSS = {"loss": "tf", "alpha": 0.35, "c": 0.9, "gamma": 1.0}
LR = 1e-3
EMB_REG = 1e-5
CLIP = 10.0
EMB_LR = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 0.05, "adam": 1e-3}  # demo/criteo presets
SEED = 2026
DEFAULT_CACHE = ".tf4ctr-cache"
SECTIONS = ("train_1w", "train_bf16", "train_2w", "dp_adam", "reference", "interleaved", "ingest", "s3", "rss")
# The interleaved section: these A/B variants in one process, round by round (see run_ab).
INTERLEAVED_VARIANTS = ("reference", "default", "default_bf16", "eager_bn")

TARGETS = {
    # key in the report: (comparison, threshold, what)
    "ratio_vs_reference": (">=", 3.0, "ours (1 worker, batch 4096) / reference samples/s"),
    "ratio_vs_reference_interleaved": (">=", 3.0, "the same, measured round by round in one process"),
    "ratio_vs_reference_bf16_interleaved": (">=", 3.0, "the same with dense_precision=bf16, round by round"),
    "roofline_share": (">=", 0.40, "achieved dense FLOP/s / measured fp32 matmul FLOP/s (1 worker)"),
    "ingest_vs_step": (">=", 10.0, "Parquet->Batch samples/s / training samples/s per worker"),
    "rss_10m_over_1m": ("<", 1.2, "peak worker RSS, large / small dataset"),
    "gpu_samples_per_s": (">=", 1_000_000.0, "GPU training samples/s (best batch)"),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ---- pure helpers (unit-tested) --------------------------------------------------------------


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
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


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that torch.utils.flop_counter counts while fn() runs (matmuls/convs; 2 per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def mlp_train_flops(in_dim: int, hidden: Sequence[int], batch: int, input_grad: bool) -> int:
    """Hand count for a Linear stack: forward 2*B*i*o each; backward 2*B*i*o for the weight
    gradient plus 2*B*i*o for the input gradient (not for the first layer without input_grad)."""
    total, prev = 0, in_dim
    for i, out in enumerate(hidden):
        mac = batch * prev * out
        total += 2 * mac + 2 * mac + (2 * mac if (i > 0 or input_grad) else 0)
        prev = out
    return total


def tf4ctr_train_flops_per_sample(fields: int, dim: int, easy: Sequence[int], hard: Sequence[int]) -> int:
    """Hand count of the TF4CTR (ser) dense part per training sample: both towers and both
    heads, every layer forward + weight grad + input grad (tables need the input gradient)."""
    easy_in, hard_in = fields * (dim // 2), fields * dim
    return (
        mlp_train_flops(easy_in, [*easy, 1], 1, True)  # MLP_s + simple head (400 -> 1)
        + mlp_train_flops(hard_in, [*hard, 1], 1, True)  # MLP_c + complex head
    )


def derive(
    *,
    train_1w: Optional[float],
    train_2w: Optional[float],
    reference: Optional[float],
    flops_per_sample: Optional[float],
    matmul_flops: Optional[float],
    ingest_1w: Optional[float],
    ingest_2w: Optional[float] = None,
    ingest_s3_1w: Optional[float] = None,
    rss_small: Optional[float] = None,
    rss_large: Optional[float] = None,
    train_dp_adam: Optional[float] = None,
    gpu_best: Optional[float] = None,
    train_bf16: Optional[float] = None,
    matmul_bf16_flops: Optional[float] = None,
    interleaved: Optional[dict[str, Any]] = None,
) -> dict[str, Optional[float]]:
    """The headline ratios from raw figures (samples/s, FLOPs, bytes). None where unmeasured."""
    dense_flops = lambda rate: None if rate is None or flops_per_sample is None else rate * flops_per_sample  # noqa: E731
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
    return {**derived, "targets": check_targets(derived), "raw": raw, "machine": machine, "config": config}


def report_rows(report: dict[str, Any]) -> list[tuple[str, Any, str]]:
    raw = report["raw"]
    g = lambda p: _get(raw, p)  # noqa: E731
    rows: list[tuple[str, Any, str]] = [("training (steady state, median of windows)", "", "")]
    for key, label in (
        ("table_wise_1w", "ours 1 worker  table_wise + fused rowwise_adagrad"),
        ("table_wise_1w_bf16", "ours 1 worker  same, dense_precision=bf16"),
        ("table_wise_2w", "ours 2 workers table_wise + fused rowwise_adagrad"),
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
    rows.append(("memory (peak RSS per worker, training)", "", ""))
    for key, label in (
        ("table_wise_1w", "1 worker, small dataset"),
        ("table_wise_1w_large", "1 worker, large dataset"),
        ("table_wise_2w", "2 workers, small dataset (max rank)"),
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


# ---- measurement primitives ------------------------------------------------------------------


def rss_bytes() -> dict[str, Optional[int]]:
    """Current and peak resident set size of this process.

    /proc/self/status VmHWM is the peak of this address space only (it restarts at exec, so a
    spawned child does not inherit its parent's peak); getrusage's ru_maxrss is the fallback.
    psutil is not a dependency of this project.
    """
    out: dict[str, Optional[int]] = {"rss_bytes": None, "rss_peak_bytes": None, "rss_source": None}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    out["rss_peak_bytes"] = int(line.split()[1]) * 1024
        out["rss_source"] = "/proc/self/status VmHWM"
    except OSError:
        pass
    if out["rss_peak_bytes"] is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rss_peak_bytes"] = kib * (1 if sys.platform == "darwin" else 1024)
        out["rss_source"] = "getrusage ru_maxrss"
    return out


def measure_matmul(
    n: int = 2048, reps: int = 10, trials: int = 5, device: str = "cpu", dtype: str = "float32",
    shape: Optional[tuple[int, int, int]] = None,
) -> dict[str, Any]:
    """Dense matmul FLOP/s with the current threads: (m,k)@(k,n) repeated; best and median trial."""
    import torch

    m, k, nn_ = shape or (n, n, n)
    dt = getattr(torch, dtype)
    dev = torch.device(device)
    a = torch.randn(m, k, device=dev).to(dt)
    b = torch.randn(k, nn_, device=dev).to(dt)
    c = torch.empty(m, nn_, device=dev, dtype=dt)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b, out=c)
    sync()
    rates = []
    for _ in range(trials):
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=c)
        sync()
        rates.append(2.0 * m * k * nn_ * reps / (time.perf_counter() - t0))
    return {
        "flops_per_s": max(rates),
        "median_flops_per_s": statistics.median(rates),
        "shape": [m, k, nn_],
        "dtype": dtype,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def model_flops(model_cfg: dict, loss_cfg: dict, fields: int = FIELDS, batch: int = 256) -> dict[str, float]:
    """Counted dense FLOPs per sample of TF4CTRTrain: one forward+backward (train mode) and one
    forward (eval mode), through the real model code on tiny tables (lookups count 0 FLOPs)."""
    import torch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from data_tools.synthetic import default_field_names
    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.data.batch import Batch
    from tf4ctr_dist.model import Objective, TF4CTRTrain, tf4ctr

    names = default_field_names(fields)
    torch.manual_seed(0)
    module = TF4CTRTrain(tf4ctr([(n, 3) for n in names], ModelConfig(**model_cfg), device="cpu"), Objective(LossConfig(**loss_cfg)))
    kjt = KeyedJaggedTensor(
        keys=names,
        values=torch.ones(fields * batch, dtype=torch.int64),
        lengths=torch.ones(fields * batch, dtype=torch.int32),
    )
    labels = (torch.arange(batch) % 2).float()
    b = Batch(kjt, labels, torch.zeros(batch, dtype=torch.int64), torch.arange(batch), torch.ones(batch))

    def train_step() -> None:
        loss, _ = module(b)
        loss.backward()

    module.train()
    train = count_flops(train_step)
    module.eval()
    with torch.no_grad():
        fwd = count_flops(lambda: module(b))
    return {"train_per_sample": train / batch, "forward_per_sample": fwd / batch, "counted_batch": batch,
            "counter": "torch.utils.flop_counter.FlopCounterMode (matmuls only; BN/ReLU/loss/lookups not counted)"}


def _epochs(reader) -> Iterator:
    """Batches of epoch 0, 1, 2, ... without end (the pipeline never sees StopIteration)."""
    for epoch in itertools.count():
        yield from reader.iter_epoch(epoch)


def _device(spec: dict, rank: int):
    import torch

    return torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_windows(
    step: Callable[[], int], warmup: int, windows: int, per_window: int, device, label: str = ""
) -> list[tuple[int, float, float]]:
    """Run `warmup` untimed steps, then `windows` windows of `per_window` steps:
    [(samples, wall seconds, process CPU seconds)].
    With a `label`, prints one progress line after the warm-up and after every window."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    if label:
        log(f"  {label}: {warmup} warm-up steps in {time.perf_counter() - t0:.1f}s")
    out = []
    for w in range(windows):
        samples = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per_window):
            samples += step()
        _sync(device)
        # (samples, wall s, process CPU s): CPU time is a load-insensitive diagnostic only
        out.append((samples, time.perf_counter() - t0, time.process_time() - c0))
        if label:
            log(f"  {label}: window {w + 1}/{windows}: {samples / out[-1][1]:,.0f} samples/s (this process)")
    return out


def _train_worker(rank: int, world: int, spec: dict) -> dict:
    """One training process: the real distributed path, timed windows, RSS, optional eval/profile."""
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import numpy as np
    import torch
    import torch.distributed as dist
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.data.reader import ParquetSplitReader
    from tf4ctr_dist.distributed.sharding import (
        build_optimizer,
        describe_plan,
        resolve_placement,
        shard_model,
        uses_table_kernel,
    )
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr
    from tf4ctr_dist.modules import cpu_kernels

    t_start = time.perf_counter()
    device = _device(spec, rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec.get("tf32", True)
        torch.backends.cudnn.allow_tf32 = spec.get("tf32", True)
    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    url, opts = spec["url"], spec.get("storage_options")
    manifest = load_manifest(url, opts)
    fields = [(f.name, f.vocab_size) for f in manifest.fields]
    model_cfg = ModelConfig(**spec["model"])
    tables = embedding_tables(fields, model_cfg)
    placement = resolve_placement(spec["sharding"], spec["optimizer"], device.type)
    emb_lr = EMB_LR[spec["optimizer"]]
    local_batch = spec["batch"] // world
    module = TF4CTRTrain(tf4ctr(fields, model_cfg, device="meta"), Objective(LossConfig(**spec["loss"])))
    dmp, plan = shard_model(
        module, tables, placement, device=device, embedding_lr=emb_lr,
        embedding_weight_decay=EMB_REG if placement.fused else 0.0, local_batch_size=local_batch,
    )
    optimizer = build_optimizer(
        dmp, lr=LR, embedding_lr=emb_lr, emb_reg=EMB_REG,
        emb_reg_mode="touched" if placement.fused else "full", clip_grad_norm=CLIP,
    )
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    reader = ParquetSplitReader(
        url, "train", manifest=manifest, rank=rank, world_size=world, local_batch_size=local_batch,
        shuffle=True, seed=spec["seed"], storage_options=opts, shuffle_buffer_row_groups=1,
        shuffle_buffer_rows=spec["shuffle_buffer_rows"], pad_tail=False,
    )
    it = _epochs(reader)
    dmp.train()
    last: dict[str, Any] = {}

    def step() -> int:
        out = pipeline.progress(it)
        last["out"] = out
        return int(out[3].numel())  # real rows of this step (no padding in training); no device sync

    setup_s = time.perf_counter() - t_start
    if rank == 0:
        log(f"  {spec['label']}: set up in {setup_s:.1f}s ({placement.describe()})")
    if world > 1:
        dist.barrier()
    n_windows, per_window = split_windows(spec["steps"], spec["windows"])
    t0 = time.perf_counter()
    windows = _timed_windows(step, spec["warmup"], n_windows, per_window, device, spec["label"] if rank == 0 else "")
    loop_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "rank": rank,
        "windows": windows,
        "local_batch": local_batch,
        "setup_s": setup_s,
        "loop_s": loop_s,
        "threads": torch.get_num_threads(),
        "concurrent_table_backward": module.model.concurrent_table_backward,
        # whether float32 training ran the compiled BatchNorm/ReLU/dropout kernel
        "cpu_kernel": device.type == "cpu" and model_cfg.dense_precision == "fp32" and cpu_kernels.available(),
        # whether the fused tables' backward + row-wise Adagrad ran the compiled kernel, not fbgemm's
        "table_kernel": uses_table_kernel(placement, device),
        "final_loss": float(last["out"][0].float().cpu()),
        **rss_bytes(),
    }
    if rank == 0:
        result["placement"] = placement.describe()
        result["plan"] = describe_plan(plan, tables, world)
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if spec.get("profile_steps"):  # every rank steps (collectives); rank 0 reports
        prof = _profile(step, spec["profile_steps"], device)
        if rank == 0:
            result["profile"] = prof
    pipeline.detach()
    reader.close()
    if spec.get("eval_batch") and spec.get("eval_batches", 4) > 0:
        result["eval"] = _eval_rate(dmp, spec, manifest, rank, world, device)
    return result


def _profile(step: Callable[[], int], steps: int, device) -> dict:
    """torch.profiler over `steps` training steps: top ops by self CPU time, pipeline stages."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    ops = [
        {"name": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
         "self_cpu_share": e.self_cpu_time_total / total_self, "calls_per_step": e.count / steps,
         "cpu_total_ms_per_step": e.cpu_time_total / 1e3 / steps}
        for e in top[:30]
    ]
    stages: dict[str, float] = {}
    for e in events:
        if e.key.startswith("##"):  # TorchRec pipeline stages, e.g. "## forward 12 ##" (batch number)
            name = stage_name(e.key)
            stages[name] = stages.get(name, 0.0) + e.cpu_time_total / 1e3 / steps
    table = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    return {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "top_ops": ops, "table": table,
            "stages_cpu_total_ms_per_step": dict(sorted(stages.items(), key=lambda kv: -kv[1]))}


def _eval_rate(dmp, spec: dict, manifest, rank: int, world: int, device) -> dict:
    """Eval-mode DMP forward on preloaded valid batches (ingest excluded): median of passes."""
    import torch

    from tf4ctr_dist.data.reader import ParquetSplitReader

    local = max(1, spec["eval_batch"] // world)
    with ParquetSplitReader(
        spec["url"], "valid", manifest=manifest, rank=rank, world_size=world, local_batch_size=local,
        shuffle=False, storage_options=spec.get("storage_options"), pad_tail=True,
    ) as reader:
        batches = [b.to(device) for b in itertools.islice(reader.iter_epoch(0), spec.get("eval_batches", 4))]
    dmp.eval()
    rates = []
    with torch.no_grad():
        for b in batches[:1]:
            dmp(b)
        _sync(device)
        for _ in range(spec.get("eval_passes", 3)):
            t0 = time.perf_counter()
            n = 0
            for b in batches:
                dmp(b)
                n += int(b.valid.numel())
            _sync(device)
            rates.append(n * world / (time.perf_counter() - t0))
    dmp.train()
    return {"samples_per_s": statistics.median(rates), "passes": rates, "batch": local * world, "batches": len(batches)}


def _load_rows(url: str, manifest, rows: int, batch: int, seed: int):
    """First `rows` rows of the shuffled train stream as (ids (n, F) int64, labels (n,))."""
    import torch

    from tf4ctr_dist.data.reader import ParquetSplitReader

    ids, labels, n = [], [], 0
    with ParquetSplitReader(url, "train", manifest=manifest, rank=0, world_size=1, local_batch_size=batch,
                            shuffle=True, seed=seed, shuffle_buffer_row_groups=1, pad_tail=False) as reader:
        for b in reader.iter_epoch(0):
            kjt = b.sparse_features
            if not bool((kjt.lengths() == 1).all()):
                raise ValueError("the reference needs exactly one id per field and row")
            ids.append(kjt.values().view(len(manifest.fields), -1).t().contiguous())
            labels.append(b.labels)
            n += b.size
            if n >= rows:
                break
    return torch.cat(ids)[:rows], torch.cat(labels)[:rows]


def _reference_worker(rank: int, world: int, spec: dict) -> dict:
    """The plain single-process baseline: per-field nn.Embedding, dense Adam, full-table L2."""
    import torch

    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(spec["url"])
    ref_step, rows_in_memory = _reference_stepper(spec, manifest, spec["warmup"] + spec["steps"])
    last: dict[str, Any] = {}

    def step() -> int:
        (last["loss"],) = ref_step()
        return min(spec["batch"], rows_in_memory)

    n_windows, per_window = split_windows(spec["steps"], spec["windows"])
    windows = _timed_windows(step, spec["warmup"], n_windows, per_window, torch.device("cpu"), "reference")
    return {"windows": windows, "threads": torch.get_num_threads(), "rows_in_memory": rows_in_memory,
            "embedding_rows": sum(f.vocab_size for f in manifest.fields), "final_loss": float(last["loss"]),
            **rss_bytes()}


def _ingest_worker(rank: int, world: int, spec: dict) -> dict:
    """ParquetSplitReader alone over one epoch of one worker's share: batches/s and samples/s."""
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.data.reader import ParquetSplitReader

    opts = spec.get("storage_options")
    manifest = load_manifest(spec["url"], opts)
    t0 = time.perf_counter()
    first = None
    batches = samples = first_samples = 0
    with ParquetSplitReader(
        spec["url"], "train", manifest=manifest, rank=spec["reader_rank"], world_size=spec["reader_world"],
        local_batch_size=spec["local_batch"], shuffle=True, seed=spec["seed"], storage_options=opts,
        shuffle_buffer_row_groups=1, shuffle_buffer_rows=spec["shuffle_buffer_rows"], pad_tail=False,
    ) as reader:
        for b in reader.iter_epoch(0):
            if first is None:
                first, first_samples = time.perf_counter() - t0, b.size
            batches += 1
            samples += b.size
            if spec.get("max_batches") and batches >= spec["max_batches"]:
                break
    s = time.perf_counter() - t0
    after_first = s - (first or 0.0)
    return {"batches": batches, "samples": samples, "seconds": s, "samples_per_s": samples / s,
            "batches_per_s": batches / s, "first_batch_s": first,
            # after the first batch: the rate once the first shuffle window is in memory
            "after_first_samples_per_s": (samples - first_samples) / after_first if after_first > 0 else None,
            "local_batch": spec["local_batch"],
            "share_of": spec["reader_world"], **rss_bytes()}


# ---- A/B: old vs new training step, alternating in one process ----------------------------------

# name -> tf4ctr(...) keyword arguments and ModelConfig overrides
AB_VARIANTS: dict[str, dict[str, Any]] = {
    # Each variant: fused_dense (MLPEncoder fused path), model (ModelConfig overrides), and the
    # switches below; a switch left out takes the value it had before it was added, so the old
    # names still measure the old paths.
    #   reuse_ordered_embeddings (default True), mask_words ("torch" | "sfc64", default "torch"),
    #   fused_adam (default False), concurrent_table_backward (default False), bn_kernel (the
    #   compiled BatchNorm/ReLU/dropout CPU kernel, default False), table_kernel (the compiled
    #   table backward + row-wise Adagrad in place of fbgemm's, default False), bounds_check (fbgemm's
    #   separate id check before each CPU lookup, default True).
    # nn.Sequential towers, torch dropout, always regrouping the pooled embeddings (before)
    "plain": {"fused_dense": False, "model": {}, "reuse_ordered_embeddings": False},
    # the fused path, but always regrouping the pooled embeddings (before the no-copy change)
    "fused_regroup": {"fused_dense": True, "model": {}, "reuse_ordered_embeddings": False},
    "fused": {"fused_dense": True, "model": {}},  # fused ReLU+dropout, 16-bit masks from torch's generator
    "fused_bf16": {"fused_dense": True, "model": {"dense_precision": "bf16"}},
    # + keep-mask words from numpy's SFC64 seeded by torch
    "masks": {"fused_dense": True, "model": {}, "mask_words": "sfc64"},
    # + torch's fused Adam for the dense parameters
    "masks_adam": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True},
    # + the two table sets' backward on two threads
    "masks_adam_concurrent": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True,
                              "concurrent_table_backward": True},
    "bf16_masks_adam_concurrent": {"fused_dense": True, "model": {"dense_precision": "bf16"}, "mask_words": "sfc64",
                                   "fused_adam": True, "concurrent_table_backward": True},
    # + BatchNorm -> ReLU -> dropout as one compiled kernel (float32 only)
    "bn_kernel": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True,
                  "concurrent_table_backward": True, "bn_kernel": True},
    # + the table backward and row-wise Adagrad update as one compiled multi-threaded kernel in
    # place of fbgemm's, the two table sets one after the other (the kernel has the threads)
    "table_kernel": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True,
                     "concurrent_table_backward": False, "bn_kernel": True, "table_kernel": True},
    # + no separate id bounds check on CPU (the lookup checks ids itself): today's default
    "no_bounds_check": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True,
                        "concurrent_table_backward": False, "bn_kernel": True, "table_kernel": True,
                        "bounds_check": False},
    # the same with the two sets on two threads as well (measured level with it: 1.00x)
    "table_kernel_concurrent": {"fused_dense": True, "model": {}, "mask_words": "sfc64", "fused_adam": True,
                                "concurrent_table_backward": True, "bn_kernel": True, "table_kernel": True},
    # the reference (ReferenceTF4CTR + ReferenceStep on in-memory batches), for ratios measured
    # round by round against it instead of in separate processes minutes apart
    "reference": {"reference": True},
}
AB_VARIANTS["default"] = AB_VARIANTS["no_bounds_check"]  # what training runs today
# today's fp32 with TF4CTR_CPU_KERNELS=0 (eager BatchNorm, fbgemm's table kernel on two threads)
AB_VARIANTS["eager_bn"] = {**AB_VARIANTS["masks_adam_concurrent"], "bounds_check": False}
# today's default with dense_precision=bf16 (the BatchNorm kernel is float32 only; the table kernel runs)
AB_VARIANTS["default_bf16"] = {**AB_VARIANTS["no_bounds_check"], "model": {"dense_precision": "bf16"}}


def _fbgemm_table_batches(dmp) -> list:
    """fbgemm's table-batch modules inside the sharded collections (TorchRec keeps them in lookups
    outside the module tree)."""
    found = []
    for m in dmp.modules():
        for lookup in getattr(m, "_lookups", []):
            for emb in getattr(getattr(lookup, "module", lookup), "_emb_modules", []):
                if hasattr(getattr(emb, "_emb_module", None), "bounds_check_mode_int"):
                    found.append(emb._emb_module)
    if not found:
        raise RuntimeError("no fbgemm table batch found in the sharded model")
    return found


def _reference_stepper(spec: dict, manifest, steps: int) -> tuple[Callable[[], tuple], int]:
    """(step, rows held): ReferenceTF4CTR + ReferenceStep over the first rows of the shuffled train
    stream, enough for `steps` batches, held in memory and cycled; step() -> (loss,)."""
    import torch

    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.reference import ReferenceStep, ReferenceTF4CTR

    batch = spec["batch"]
    torch.manual_seed(spec["seed"])
    ids, labels = _load_rows(spec["url"], manifest, min(manifest.split("train").rows, batch * steps), batch, spec["seed"])
    model = ReferenceTF4CTR([f.vocab_size for f in manifest.fields], ModelConfig(**spec["model"]))
    model.train()
    ref_step = ReferenceStep(model, LossConfig(**spec["loss"]), emb_reg=EMB_REG, clip=CLIP, lr=LR)
    pos = {"i": 0}

    def step() -> tuple:
        i = pos["i"] if pos["i"] + batch <= len(ids) else 0
        pos["i"] = i + batch
        return (ref_step(ids[i : i + batch], labels[i : i + batch]).detach(),)

    return step, len(ids)


def _ab_worker(rank: int, world: int, spec: dict) -> dict:
    """Build every variant of the real 1-worker path (own DMP, optimizer, pipeline, reader), then
    time `per_round` steps of each in turn for `rounds` rounds (order rotated every round)."""
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.data.reader import ParquetSplitReader
    from tf4ctr_dist.distributed.sharding import build_optimizer, resolve_placement, shard_model
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr
    from tf4ctr_dist.modules import cpu_kernels, mlp

    manifest = load_manifest(spec["url"])
    fields = [(f.name, f.vocab_size) for f in manifest.fields]
    device = torch.device("cpu")
    placement = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    emb_lr = EMB_LR["rowwise_adagrad"]
    steppers: dict[str, Callable[[], Any]] = {}
    for name in spec["variants"]:
        v = AB_VARIANTS[name]
        if v.get("reference"):
            steps = spec["warmup"] + spec["rounds"] * spec["per_round"] + spec.get("profile_steps", 0)
            steppers[name], _ = _reference_stepper(spec, manifest, steps)
            continue
        model_cfg = ModelConfig(**{**spec["model"], **v["model"]})
        tables = embedding_tables(fields, model_cfg)
        torch.manual_seed(spec["seed"])
        model = tf4ctr(fields, model_cfg, device="meta", fused_dense=v["fused_dense"])
        model.reuse_ordered_embeddings = v.get("reuse_ordered_embeddings", True)
        module = TF4CTRTrain(model, Objective(LossConfig(**spec["loss"])))
        dmp, _ = shard_model(module, tables, placement, device=device, embedding_lr=emb_lr,
                             embedding_weight_decay=EMB_REG, local_batch_size=spec["batch"],
                             concurrent_table_backward=v.get("concurrent_table_backward", False))
        if v.get("bounds_check", True):  # the variants from before the check was dropped on CPU
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

            for tbe in _fbgemm_table_batches(dmp):
                tbe.bounds_check_mode_int = BoundsCheckMode.WARNING.value
        optimizer = build_optimizer(dmp, lr=LR, embedding_lr=emb_lr, emb_reg=EMB_REG,
                                    emb_reg_mode="touched", clip_grad_norm=CLIP,
                                    fused_adam=v.get("fused_adam", False))
        pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
        reader = ParquetSplitReader(
            spec["url"], "train", manifest=manifest, rank=0, world_size=1, local_batch_size=spec["batch"],
            shuffle=True, seed=spec["seed"], shuffle_buffer_row_groups=1,
            shuffle_buffer_rows=spec["shuffle_buffer_rows"], pad_tail=False,
        )
        dmp.train()

        def stepper(p=pipeline, it=_epochs(reader), words=v.get("mask_words", "torch"), kernel=v.get("bn_kernel", False),
                    table_kernel=v.get("table_kernel", False)):
            mlp.KEEP_MASK_WORDS = words  # module switches: set before every step of this variant
            cpu_kernels.ENABLED = True  # routing is a no-op while the kernels are switched off
            cpu_kernels.route_fbgemm_rowwise_adagrad(table_kernel)
            cpu_kernels.ENABLED = kernel
            return p.progress(it)

        steppers[name] = stepper
    losses: dict[str, list[float]] = {n: [] for n in steppers}
    for name, step in steppers.items():
        for _ in range(spec["warmup"]):
            step()
        log(f"  ab: {name} warmed up")
    rounds: dict[str, list[tuple[float, float]]] = {n: [] for n in steppers}
    names = list(steppers)
    for r in range(spec["rounds"]):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(spec["per_round"]):
                out = steppers[name]()
            rounds[name].append((time.perf_counter() - t0, time.process_time() - c0))
            losses[name].append(float(out[0]))
        log(f"  ab round {r + 1}/{spec['rounds']}: " + ", ".join(
            f"{n} {spec['per_round'] * spec['batch'] / rounds[n][-1][0]:,.0f}/s" for n in names))
    profiles = {n: _profile(steppers[n], spec["profile_steps"], device) for n in names} if spec.get("profile_steps") else {}
    return {"rounds": rounds, "losses": losses, "threads": torch.get_num_threads(), "profiles": profiles}


def _op_ab_worker(rank: int, world: int) -> dict:
    return run_op_ab()


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


def run_ab(argv: Optional[Sequence[str]] = None) -> dict:
    """A/B timing of training-step variants side by side (see AB_VARIANTS); prints ratios."""
    p = argparse.ArgumentParser(prog="ab_step", description=run_ab.__doc__)
    p.add_argument("--variants", default="plain,fused", help=f"comma list, the first is the baseline: {','.join(AB_VARIANTS)}")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=5, help="steps per variant per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after the rounds, torch.profiler over STEPS steps of each variant (top ops printed)")
    p.add_argument("--relu-dropout", action="store_true",
                   help="only the op-level A/B of relu_dropout (first fused version vs current)")
    args = p.parse_args(argv)
    if args.relu_dropout:
        r = spawn(_op_ab_worker, 1, backend=None, threads=1, timeout=1800)[0]
        print(json.dumps(r, indent=2))
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=2))
        return r
    from tf4ctr_dist.config import DataConfig

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(AB_VARIANTS)
    if unknown:
        p.error(f"unknown variant(s) {sorted(unknown)}")
    spec = {"url": ensure_dataset(args.rows, args.cache_dir), "variants": variants, "batch": args.batch,
            "warmup": args.warmup, "rounds": args.rounds, "per_round": args.per_round, "seed": SEED,
            "model": _model_cfg(), "loss": dict(LOSS), "shuffle_buffer_rows": DataConfig().shuffle_buffer_rows,
            "profile_steps": args.profile}
    threads = args.threads or cores()
    machine = machine_info()
    log(f"A/B {variants} on {threads} thread(s), batch {args.batch}, {args.rounds} rounds x {args.per_round} steps; "
        f"load average {machine['loadavg_start'][0]:.2f}")
    r = spawn(_ab_worker, 1, spec, backend="gloo", threads=threads, timeout=3600)[0]
    base = variants[0]
    summary = summarize_ab(r, variants, spec["per_round"], args.batch)
    rows = [(f"{n} samples/s (median of rounds)", s["samples_per_s"], "samples/s") for n, s in summary.items()]
    rows += [(f"{n} / {base} (median of per-round ratios; min..max {s['ratio_vs_base_min']:.2f}..{s['ratio_vs_base_max']:.2f})",
              s["ratio_vs_base"], "x") for n, s in summary.items() if n != base]
    rows += [(f"{n} / {base} per CPU-second", s["cpu_ratio_vs_base"], "x") for n, s in summary.items() if n != base]
    rows += [(f"{n} / {s['previous']} (median of per-round ratios)", s["ratio_vs_previous"], "x")
             for n, s in list(summary.items())[2:]]
    machine["loadavg_end"] = os.getloadavg()
    for name, prof in r["profiles"].items():
        print(f"\n-- profile of {name}: {prof['wall_ms_per_step']:.1f} ms per step (wall, profiled)")
        for op in prof["top_ops"][:15]:
            print(f"  {op['self_cpu_share'] * 100:5.1f}%  {op['self_cpu_ms_per_step']:7.2f} ms  "
                  f"{op['calls_per_step']:5.0f} calls  {op['name'][:70]}")
    print(format_table(rows))
    print(f"(threads {r['threads']}; load average start {machine['loadavg_start'][0]:.2f}, end {machine['loadavg_end'][0]:.2f})")
    report = {"summary": summary, "raw": r, "config": {**spec, "threads": threads, "argv": list(argv or [])}, "machine": machine}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return report



def run_op_ab(rounds: int = 30, shape: tuple[int, int] = (4096, 400), p: float = 0.2) -> dict[str, Any]:
    """relu_dropout forward+backward, the first fused version (float compare, bool -> float mask)
    vs the current one (sign-bit compare, uint8 -> float mask), alternating, 1 thread, per dtype."""
    import torch

    from tf4ctr_dist.modules import mlp

    class V1(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, keep, scale):  # type: ignore[override]
            kf = torch.logical_and(x > 0, keep).to(x.dtype).mul_(scale)
            ctx.save_for_backward(kf)
            return x * kf

        @staticmethod
        def backward(ctx, grad):  # type: ignore[override]
            (kf,) = ctx.saved_tensors
            return grad * kf, None, None

    torch.set_num_threads(1)
    _, scale = mlp.dropout_threshold(p)
    out: dict[str, Any] = {"shape": list(shape), "p": p, "rounds": rounds}
    for dtype in (torch.float32, torch.bfloat16):
        x0 = torch.randn(*shape).to(dtype)
        g = torch.randn(*shape).to(dtype)

        def run(fn) -> float:
            x = x0.clone().requires_grad_()
            keep = mlp.dropout_keep_mask(shape, p)
            c0 = time.thread_time()
            fn(x, keep, scale).backward(g)
            return time.thread_time() - c0

        old = lambda x, k, s: V1.apply(x, k, s)  # noqa: E731
        new = lambda x, k, s: mlp._ReLUDropout.apply(x, k, s)  # noqa: E731
        for _ in range(3):
            run(old), run(new)
        pairs = [(run(old), run(new)) if r % 2 == 0 else tuple(reversed((run(new), run(old)))) for r in range(rounds)]
        out[str(dtype).replace("torch.", "")] = {
            "old_ms": statistics.median(a for a, _ in pairs) * 1e3,
            "new_ms": statistics.median(b for _, b in pairs) * 1e3,
            "ratio_old_over_new": statistics.median(a / b for a, b in pairs),
        }
    return out


def _gpu_matmul_worker(rank: int, world: int) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = measure_matmul(8192, reps=10, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = measure_matmul(8192, reps=20, device="cuda", dtype="float32")
    bf16 = measure_matmul(8192, reps=50, device="cuda", dtype="bfloat16")
    tf32_model = measure_matmul(device="cuda", dtype="float32", reps=50, shape=(65536, 624, 400))
    return {"fp32": fp32, "tf32": tf32, "bf16": bf16, "tf32_model_shape": tf32_model,
            "name": torch.cuda.get_device_name(0)}


# ---- datasets, S3 ------------------------------------------------------------------------------


def ensure_dataset(rows: int, cache: str) -> str:
    """The synthetic Criteo-shaped dataset of `rows` rows, cached at {cache}/bench-{rows}."""
    from data_tools.synthetic import generate_synthetic
    from tf4ctr_dist.data.manifest import load_manifest

    url = os.path.abspath(os.path.join(cache, f"bench-{rows}"))
    try:
        if load_manifest(url).spec.get("rows") == rows:
            log(f"reusing dataset {url}")
            return url
    except Exception:  # noqa: BLE001 - absent or partial: (re)generate
        pass
    log(f"generating {rows:,} synthetic Criteo-shaped rows -> {url}")
    t0 = time.perf_counter()
    generate_synthetic(url, rows=rows, fields=FIELDS, seed=SEED, overwrite=True)
    log(f"  generated in {time.perf_counter() - t0:.1f}s")
    return url


@contextlib.contextmanager
def local_s3(bucket: str = "tf4ctr-bench") -> Iterator[dict[str, Any]]:
    """A moto S3 server on 127.0.0.1 (this process, a thread) with one bucket; yields
    {"endpoint", "bucket", "storage_options"}. Dummy credentials, valid only for this server."""
    from moto.server import ThreadedMotoServer

    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    key, secret = "bench-local-key", "bench-local-secret"
    try:
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret
        )
        client.create_bucket(Bucket=bucket)
        options = {
            "key": key, "secret": secret,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}},
        }
        yield {"endpoint": endpoint, "bucket": bucket, "storage_options": options}
    finally:
        server.stop()


# ---- machine -----------------------------------------------------------------------------------


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    fl = line.split(":", 1)[1].split()
                    flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if x in fl)
                    break
    except OSError:
        pass

    def version(dist_name: str) -> Optional[str]:
        try:
            return md.version(dist_name)
        except md.PackageNotFoundError:
            return None

    gpu = None
    if torch.cuda.is_available():
        gpu = {"count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "cpu_flags": flags,
        "memory_bytes": mem,
        "gpu": gpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "torchrec": version("torchrec"),
            "fbgemm_gpu": version("fbgemm_gpu") or version("fbgemm_gpu-cpu") or version("fbgemm-gpu-cpu"),
            "ray": version("ray"),
            "pyarrow": version("pyarrow"),
            "numpy": version("numpy"),
            "s3fs": version("s3fs"),
            "moto": version("moto"),
        },
        "torch_parallel_info": torch.__config__.parallel_info().splitlines()[:6],
        "loadavg_start": os.getloadavg(),
    }


# ---- orchestration -----------------------------------------------------------------------------


def _train_summary(results: list[dict]) -> dict[str, Any]:
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


def _timeout(args) -> float:
    return 900.0 + 20.0 * (args.warmup + args.steps)


def _interleaved(args, url: str) -> dict:
    """The reference, our 1-worker default (fp32 and bf16) and fp32 without the CPU kernel in
    ONE process, `per_round` steps
    of each in turn for `rounds` rounds: ratios that a slow drift of the machine cannot bias."""
    from tf4ctr_dist.config import DataConfig

    variants = list(INTERLEAVED_VARIANTS)
    threads = args.threads or cores()
    spec = {"url": url, "variants": variants, "batch": args.batch, "warmup": 3, "rounds": args.interleaved_rounds,
            "per_round": 2, "seed": SEED, "model": _model_cfg(), "loss": dict(LOSS),
            "shuffle_buffer_rows": DataConfig().shuffle_buffer_rows}
    log(f"interleaved: {', '.join(variants)} in one process x {threads} threads, "
        f"{spec['rounds']} rounds x {spec['per_round']} steps each")
    r = spawn(_ab_worker, 1, spec, backend="gloo", threads=threads, timeout=_timeout(args) * 3)[0]
    summary = summarize_ab(r, variants, spec["per_round"], args.batch)
    for name, v in summary.items():
        log(f"  {name}: {v['samples_per_s']:,.0f} samples/s, {v['ratio_vs_base']:.2f}x the reference "
            f"(per-round {v['ratio_vs_base_min']:.2f}..{v['ratio_vs_base_max']:.2f})")
    return {"variants": summary, "rounds": r["rounds"], "threads": r["threads"],
            "spec": {k: spec[k] for k in ("warmup", "rounds", "per_round", "batch")}}


def _train(args, url: str, workers: int, sharding: str, optimizer: str, label: str, **extra: Any) -> dict:
    spec = {
        "url": url, "device": extra.pop("device", "cpu"), "sharding": sharding, "optimizer": optimizer,
        "batch": extra.pop("batch", args.batch), "warmup": args.warmup, "steps": args.steps,
        "windows": args.windows, "seed": SEED, "model": _model_cfg(), "loss": dict(LOSS),
        "shuffle_buffer_rows": args.shuffle_buffer_rows, "label": label, **extra,
    }
    threads = args.threads or max(1, cores() // workers)
    backend = "nccl" if spec["device"] == "cuda" else "gloo"
    log(f"train {label}: {workers} worker(s) x {threads} thread(s), {sharding}/{optimizer}, "
        f"batch {spec['batch']} on {spec['device']}, {args.warmup} warm-up + {args.steps} timed steps")
    t0 = time.perf_counter()
    results = spawn(_train_worker, workers, spec, backend=backend, threads=threads, timeout=_timeout(args))
    summary = _train_summary(results)
    log(f"  {label}: {summary['samples_per_s']:,.0f} samples/s (windows {summary['windows']}), "
        f"peak RSS {summary['rss_peak_bytes'] / 2**20:,.0f} MiB, loss {summary['final_loss']:.4f}, "
        f"{time.perf_counter() - t0:.0f}s")
    return summary


def _model_cfg() -> dict:
    from tf4ctr_dist.config import ModelConfig

    return dataclasses.asdict(ModelConfig())  # d=16, ser, wsf, MLP_s [400,400], MLP_c [400,400,400]


def _ingest(args, url: str, reader_world: int, local_batch: int, label: str, storage_options=None) -> dict:
    spec = {"url": url, "reader_rank": 0, "reader_world": reader_world, "local_batch": local_batch,
            "seed": SEED, "shuffle_buffer_rows": args.shuffle_buffer_rows, "storage_options": storage_options,
            "max_batches": args.ingest_max_batches}
    threads = max(1, cores() // reader_world)
    r = spawn(_ingest_worker, 1, spec, backend=None, threads=threads, timeout=_timeout(args))[0]
    log(f"  ingest {label}: {r['samples_per_s']:,.0f} samples/s, {r['batches_per_s']:.1f} batches/s "
        f"({r['batches']} batches in {r['seconds']:.1f}s, first after {r['first_batch_s']:.2f}s; "
        f"{r['after_first_samples_per_s'] or 0:,.0f} samples/s after it)")
    return r


def _ratio_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def run(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--rows-small", "--rows", dest="rows_small", type=int, default=1_000_000,
                   help="rows of the main dataset (training, ingest, reference, RSS small)")
    p.add_argument("--rows-large", type=int, default=10_000_000, help="rows of the RSS comparison dataset")
    p.add_argument("--batch", type=int, default=4096, help="global training batch")
    p.add_argument("--eval-batch", type=int, default=16384, help="global eval batch")
    p.add_argument("--steps", type=int, default=100, help="timed steps per training measurement")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    p.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    p.add_argument("--shuffle-buffer-rows", type=int, default=None,
                   help="reader shuffle window in rows (default: the training default, DataConfig)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per training worker (0: cores // workers)")
    p.add_argument("--eval-batches", type=int, default=4, help="preloaded eval batches per pass (0: no eval)")
    p.add_argument("--eval-passes", type=int, default=3, help="timed eval passes (the median is reported)")
    p.add_argument("--ingest-max-batches", type=int, default=0, help="cap ingest batches (0: one epoch)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="torch.profiler over STEPS steps of the 1-worker run; top ops go to the report")
    p.add_argument("--interleaved-rounds", type=int, default=10,
                   help="rounds of the interleaved reference / default / default_bf16 / eager_bn comparison (2 steps each)")
    p.add_argument("--only", default="", help=f"comma list of CPU sections to run (default all): {','.join(SECTIONS)}")
    p.add_argument("--skip-s3", action="store_true", help="no local S3 server / S3 ingest")
    p.add_argument("--skip-rss", action="store_true", help="no large dataset / RSS comparison")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-cpu", action="store_true", help="with --gpu: only the GPU measurements")
    p.add_argument("--gpu", action="store_true", help="also measure CUDA/nccl training with fused Adam")
    p.add_argument("--gpu-batches", default="4096,65536", help="global batches for --gpu")
    p.add_argument("--gpu-workers", type=int, default=0, help="GPUs to use (0: all visible)")
    p.add_argument("--gpu-sharding", default="table_wise", choices=["table_wise", "auto", "column_wise", "row_wise"])
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where generated datasets are cached")
    args = p.parse_args(argv)
    if args.shuffle_buffer_rows is None:
        from tf4ctr_dist.config import DataConfig

        args.shuffle_buffer_rows = DataConfig().shuffle_buffer_rows
    if args.batch % 2:
        p.error("--batch must be even (it is split over 2 workers)")
    only = {x.strip() for x in args.only.split(",") if x.strip()} if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        p.error(f"--only: unknown section(s) {sorted(only - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    skipped = {"reference": args.skip_reference, "s3": args.skip_s3, "rss": args.skip_rss}

    def want(section: str) -> bool:
        return section in only and not skipped.get(section, False)

    import torch

    t_all = time.perf_counter()
    machine = machine_info()
    log(f"machine: {machine['cores']} cores, {machine['cpu_model']}, torch {machine['versions']['torch']}, "
        f"load average {machine['loadavg_start'][0]:.2f}")
    config = {
        "model": _model_cfg(), "loss": dict(LOSS), "fields": FIELDS, "batch": args.batch,
        "eval_batch": args.eval_batch, "lr": LR, "embedding_lr": EMB_LR, "emb_reg": EMB_REG,
        "emb_reg_mode": {"fused (table_wise)": "touched (fbgemm L2 on looked-up rows)",
                         "data_parallel": "full (Adam coupled weight decay on every row)",
                         "reference": "full ((lambda/2)*||E||^2 in the loss)"},
        "clip_grad_norm": CLIP,
        "clip_scope": {"reference": "every parameter (ReferenceStep default)",
                       "data_parallel": "dense + replicated tables (build_optimizer default)",
                       "fused (table_wise)": "dense only (tables updated inside backward)"},
        "warmup": args.warmup, "steps": args.steps, "windows": args.windows,
        "shuffle_buffer_rows": args.shuffle_buffer_rows, "rows_small": args.rows_small,
        "rows_large": args.rows_large if want("rss") else None, "seed": SEED, "sections": [x for x in SECTIONS if want(x)],
        "threads_per_worker": {"1": args.threads or max(1, cores()), "2": args.threads or max(1, cores() // 2)},
        "dropout_batchnorm": "as ModelConfig (train mode: dropout 0.2, BatchNorm)",
        "dense_path": "fused (MLPEncoder(fused=True): Linear -> BatchNorm -> fused ReLU+dropout, 16-bit masks "
                      "from SFC64 words); dense Adam: torch fused; 1 CPU worker: the two table sets' backward "
                      "on two threads (shard_model default)",
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    raw: dict[str, Any] = {"train": {}, "ingest": {}}
    small = ensure_dataset(args.rows_small, args.cache_dir)
    large = ensure_dataset(args.rows_large, args.cache_dir) if want("rss") and not args.skip_cpu else None
    config["datasets"] = {"small": small, "large": large}

    log("counting model FLOPs (FlopCounterMode, one forward+backward)")
    raw["flops"] = model_flops(_model_cfg(), dict(LOSS))
    raw["flops"]["hand_count_train_per_sample"] = tf4ctr_train_flops_per_sample(
        FIELDS, config["model"]["embedding_dim"], config["model"]["easy_hidden_units"], config["model"]["hard_hidden_units"])
    log(f"  {raw['flops']['train_per_sample'] / 1e6:.3f} MFLOP per training sample "
        f"(hand count {raw['flops']['hand_count_train_per_sample'] / 1e6:.3f})")

    if not args.skip_cpu:
        torch.set_num_threads(cores())
        log(f"fp32 matmul 2048x2048 on {torch.get_num_threads()} threads")
        mm_start = measure_matmul(2048)
        first_layer = (args.batch, FIELDS * config["model"]["embedding_dim"], config["model"]["hard_hidden_units"][0])
        mm_model = measure_matmul(shape=first_layer, reps=20)
        log(f"  {mm_start['flops_per_s'] / 1e9:.1f} GFLOP/s (model shape {first_layer}: {mm_model['flops_per_s'] / 1e9:.1f})")

        if want("train_1w"):
            one = _train(args, small, 1, "table_wise", "rowwise_adagrad", "table_wise_1w",
                         eval_batch=args.eval_batch, eval_batches=args.eval_batches,
                         eval_passes=args.eval_passes, profile_steps=args.profile)
            raw["train"]["table_wise_1w"] = one
            if one.get("eval"):
                log(f"  eval (DMP forward, batch {one['eval']['batch']}): {one['eval']['samples_per_s']:,.0f} samples/s")
            if one.get("profile"):
                print(one["profile"]["table"], flush=True)
        if want("train_bf16"):
            raw["train"]["table_wise_1w_bf16"] = _train(
                args, small, 1, "table_wise", "rowwise_adagrad", "table_wise_1w_bf16",
                model={**_model_cfg(), "dense_precision": "bf16"})
        if want("train_2w"):
            raw["train"]["table_wise_2w"] = _train(args, small, 2, "table_wise", "rowwise_adagrad", "table_wise_2w")
        if want("dp_adam"):
            raw["train"]["data_parallel_adam_1w"] = _train(args, small, 1, "data_parallel", "adam",
                                                           "data_parallel_adam_1w")
        if want("reference"):
            ref_threads = args.threads or cores()
            log(f"reference: ReferenceTF4CTR + ReferenceStep, 1 process x {ref_threads} threads, batch {args.batch}")
            spec = {"url": small, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                    "windows": args.windows, "seed": SEED, "model": _model_cfg(), "loss": dict(LOSS)}
            ref = spawn(_reference_worker, 1, spec, backend=None, threads=ref_threads, timeout=_timeout(args) * 3)[0]
            cpu_s = sum(w[2] for w in ref["windows"])
            raw["reference"] = {**summarize_rates(window_rates([ref["windows"]])),
                                "samples_per_cpu_s": sum(w[0] for w in ref["windows"]) / cpu_s if cpu_s else None,
                                **{k: v for k, v in ref.items() if k != "windows"}}
            log(f"  reference: {raw['reference']['samples_per_s']:,.0f} samples/s (windows {raw['reference']['windows']})")
        if want("interleaved"):
            raw["interleaved"] = _interleaved(args, small)
        if want("ingest"):
            log("ingest: ParquetSplitReader alone, one epoch of one worker's share")
            raw["ingest"]["local_1w"] = _ingest(args, small, 1, args.batch, "local_1w")
            raw["ingest"]["local_2w"] = _ingest(args, small, 2, args.batch // 2, "local_2w")
        if want("s3"):
            with local_s3() as s3:
                s3_url = f"s3://{s3['bucket']}/bench-{args.rows_small}"
                log(f"local S3 server at {s3['endpoint']}: writing {args.rows_small:,} rows with generate_synthetic")
                from data_tools.synthetic import generate_synthetic

                t0 = time.perf_counter()
                generate_synthetic(s3_url, rows=args.rows_small, fields=FIELDS, seed=SEED,
                                   storage_options=s3["storage_options"])
                log(f"  uploaded in {time.perf_counter() - t0:.1f}s")
                raw["ingest"]["s3_1w"] = _ingest(args, s3_url, 1, args.batch, "s3_1w", s3["storage_options"])
                raw["ingest"]["s3_1w"]["server"] = "moto ThreadedMotoServer in the benchmark process"
        if large:
            raw["train"]["table_wise_1w_large"] = _train(args, large, 1, "table_wise", "rowwise_adagrad",
                                                         "table_wise_1w_large")
        mm_end = measure_matmul(2048)
        mm_bf16 = measure_matmul(2048, dtype="bfloat16")
        raw["matmul_cpu"] = {
            "flops_per_s": max(mm_start["flops_per_s"], mm_end["flops_per_s"]),
            "bf16_flops_per_s": mm_bf16["flops_per_s"], "bf16": mm_bf16,
            "start": mm_start, "end": mm_end,
            "model_shape_flops_per_s": mm_model["flops_per_s"], "model_shape": mm_model,
        }

    if args.gpu:
        # The large dataset: at batch 65536 the small one has only ~12 steps per epoch, and every
        # epoch starts with a synchronous read of its first shuffle window.
        gpu_url = large or ensure_dataset(args.rows_large, args.cache_dir)
        raw["gpu"] = _gpu(args, gpu_url, raw["flops"])

    machine["loadavg_end"] = os.getloadavg()
    raw["wall_s"] = time.perf_counter() - t_all
    report = build_report(raw, machine, config)
    print()
    print(format_table(report_rows(report)), flush=True)
    print(f"\n(load average start {machine['loadavg_start'][0]:.2f}, end {machine['loadavg_end'][0]:.2f}; "
          f"{machine['cores']} cores; total {raw['wall_s']:.0f}s)", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.out}")
    return report


def _gpu(args, url: str, flops: dict) -> dict:
    """CUDA path: fbgemm fused Adam on sharded tables (nccl), batches from --gpu-batches."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device visible (this torch: %s)" % torch.__version__)
    workers = args.gpu_workers or torch.cuda.device_count()
    log(f"GPU: {workers} x {torch.cuda.get_device_name(0)}; matmul roofline (fp32, TF32, bf16)")
    mm = spawn(_gpu_matmul_worker, 1, backend=None, threads=cores(), timeout=600)[0]
    out: dict[str, Any] = {"workers": workers, "name": mm.pop("name"), "matmul": mm, "train": {}, "dataset": url}
    for b in (int(x) for x in args.gpu_batches.split(",") if x.strip()):
        if b % workers:
            raise SystemExit(f"--gpu-batches: {b} does not split over {workers} GPUs")
        r = _train(args, url, workers, args.gpu_sharding, "adam", f"gpu_b{b}", device="cuda", batch=b,
                   eval_batch=max(b, args.eval_batch), eval_batches=args.eval_batches,
                   eval_passes=args.eval_passes, profile_steps=args.profile)
        dense = r["samples_per_s"] * flops["train_per_sample"] if r["samples_per_s"] else None
        r["roofline_share_tf32"] = ratio(dense, mm["tf32"]["flops_per_s"] * workers)
        r["roofline_share_bf16"] = ratio(dense, mm["bf16"]["flops_per_s"] * workers)
        r["roofline_share_fp32"] = ratio(dense, mm["fp32"]["flops_per_s"] * workers)
        log(f"  GPU batch {b}: {r['samples_per_s']:,.0f} samples/s, {_ratio_pct(r['roofline_share_tf32'])} of TF32 mm")
        out["train"][str(b)] = r
    biggest = max(int(x) for x in args.gpu_batches.split(","))
    out["ingest"] = _ingest(args, url, workers, biggest // workers, f"gpu_b{biggest}")
    return out


def main() -> None:
    run(sys.argv[1:])
