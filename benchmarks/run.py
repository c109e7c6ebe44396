"""Benchmark: the distributed TF4CTR training path against the plain reference and the machine.

`python -m benchmarks --help` (from the repository root; `./dev.sh bench`). Everything runs in ONE
invocation, side by side:

  1. training samples/s of TF4CTRTrain through the real path (`build_training`: meta-built model
     -> placement -> shard_model -> build_optimizer -> TrainPipelineSparseDist, fed by
     ParquetSplitReader over a synthetic Criteo-shaped dataset), 1 and 2 gloo workers
     (table_wise + fused rowwise Adagrad), plus data_parallel + Adam on 1 worker;
  2. the plain single-process reference (benchmarks/reference.py) on the same vocabularies and
     batch, all cores;
  3. the roofline: measured dense fp32 matmul FLOP/s vs. the model's counted FLOPs per sample;
  4. ingest: ParquetSplitReader alone (local path and a local moto S3 server) vs. the step rate;
  5. evaluation throughput (DMP forward, eval mode), and inference interleaved in one process
     against the reference's forward (benchmarks/inference.py: fused fp32, bf16, eager);
  6. peak RSS per worker on a small and a large dataset (the reader streams: RSS must not grow);
  7. with --gpu: the same training path on CUDA/nccl with fbgemm's fused Adam at two batch sizes,
     as a share of the GPU's measured dense matmul roofline.

Every measurement runs in its own spawned process (torch threads = cores // workers), timed only
after a warm-up, as the median of several timed windows. Prints one table; --out writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.ab import interleaved
from benchmarks.inference import inference_section
from benchmarks.probes import (
    cores,
    machine_info,
    measure_bf16_matmul,
    measure_matmul,
    model_flops,
    tf4ctr_train_flops_per_sample,
)
from benchmarks.report import (
    build_report,
    format_table,
    ratio,
    report_rows,
    summarize_rates,
    train_summary,
    window_rates,
)
from benchmarks.settings import (
    CLIP,
    DEFAULT_CACHE,
    EMB_LR,
    EMB_REG,
    FIELDS,
    LOSS,
    LR,
    SECTIONS,
    SEED,
    log,
    model_cfg,
    run_config,
)
from benchmarks.workers import (
    ensure_dataset,
    gpu_matmul_worker,
    ingest_worker,
    reference_worker,
    train_worker,
)
from tf4ctr_dist.distributed.spawn import spawn


def _timeout(args) -> float:
    return 900.0 + 20.0 * (args.warmup + args.steps)


def _train(args, url: str, workers: int, sharding: str, optimizer: str, label: str, *, device: str = "cpu",
           batch: int | None = None, model: dict | None = None, eval_batch: int | None = None,
           eval_batches: int = 0, eval_passes: int = 3, profile_steps: int = 0,
           sync_batch_norm: bool = False) -> dict:
    batch = batch or args.batch
    config = run_config(url, workers=workers, batch=batch, sharding=sharding, optimizer=optimizer,
                        eval_batch=eval_batch, model=model, shuffle_buffer_rows=args.shuffle_buffer_rows,
                        device_type=device, sync_batch_norm=sync_batch_norm)
    spec = {"config": config, "device": device, "label": label, "warmup": args.warmup, "steps": args.steps,
            "windows": args.windows, "eval_batches": eval_batches if eval_batch else 0, "eval_passes": eval_passes,
            "profile_steps": profile_steps}
    threads = args.threads or max(1, cores() // workers)
    backend = "nccl" if device == "cuda" else "gloo"
    log(f"train {label}: {workers} worker(s) x {threads} thread(s), {sharding}/{optimizer}, "
        f"batch {batch} on {device}, {args.warmup} warm-up + {args.steps} timed steps")
    t0 = time.perf_counter()
    results = spawn(train_worker, workers, spec, backend=backend, threads=threads, timeout=_timeout(args))
    summary = train_summary(results)
    log(f"  {label}: {summary['samples_per_s']:,.0f} samples/s (windows {summary['windows']}), "
        f"peak RSS {summary['rss_peak_bytes'] / 2**20:,.0f} MiB, loss {summary['final_loss']:.4f}, "
        f"{time.perf_counter() - t0:.0f}s")
    return summary


def _ingest(args, url: str, reader_world: int, local_batch: int, label: str, storage_options=None) -> dict:
    spec = {"url": url, "reader_rank": 0, "reader_world": reader_world, "local_batch": local_batch,
            "seed": SEED, "shuffle_buffer_rows": args.shuffle_buffer_rows, "storage_options": storage_options,
            "max_batches": args.ingest_max_batches}
    threads = max(1, cores() // reader_world)
    r = spawn(ingest_worker, 1, spec, backend=None, threads=threads, timeout=_timeout(args))[0]
    log(f"  ingest {label}: {r['samples_per_s']:,.0f} samples/s, {r['batches_per_s']:.1f} batches/s "
        f"({r['batches']} batches in {r['seconds']:.1f}s, first after {r['first_batch_s']:.2f}s; "
        f"{r['after_first_samples_per_s'] or 0:,.0f} samples/s after it)")
    return r


def _ratio_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def run(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--inference-batches", type=int, default=3,
                   help="preloaded eval batches per round of the inference comparison (batch --eval-batch)")
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
        "model": model_cfg(), "loss": dict(LOSS), "fields": FIELDS, "batch": args.batch,
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
        "dense_path": "the training path: tf4ctr_dist.train.setup.build_training from the RunConfig of "
                      "benchmarks/settings.py (train.cpu_kernels=auto: the compiled BatchNorm/ReLU/dropout and "
                      "table kernels where they build; dense Adam: torch fused)",
        "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    raw: dict[str, Any] = {"train": {}, "ingest": {}}
    small = ensure_dataset(args.rows_small, args.cache_dir)
    large = ensure_dataset(args.rows_large, args.cache_dir) if want("rss") and not args.skip_cpu else None
    config["datasets"] = {"small": small, "large": large}

    log("counting model FLOPs (FlopCounterMode, one forward+backward)")
    raw["flops"] = model_flops(model_cfg(), dict(LOSS))
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
                model={**model_cfg(), "dense_precision": "bf16"})
        if want("train_2w"):
            raw["train"]["table_wise_2w"] = _train(args, small, 2, "table_wise", "rowwise_adagrad", "table_wise_2w")
        if want("train_2w_sync_bn"):  # BatchNorm over the global batch (pooled kernel halves, collectives)
            raw["train"]["table_wise_2w_sync_bn"] = _train(args, small, 2, "table_wise", "rowwise_adagrad",
                                                           "table_wise_2w_sync_bn", sync_batch_norm=True)
        if want("dp_adam"):
            raw["train"]["data_parallel_adam_1w"] = _train(args, small, 1, "data_parallel", "adam",
                                                           "data_parallel_adam_1w")
        if want("reference"):
            ref_threads = args.threads or cores()
            log(f"reference: ReferenceTF4CTR + ReferenceStep, 1 process x {ref_threads} threads, batch {args.batch}")
            spec = {"url": small, "batch": args.batch, "warmup": args.warmup, "steps": args.steps,
                    "windows": args.windows, "seed": SEED, "model": model_cfg(), "loss": dict(LOSS)}
            ref = spawn(reference_worker, 1, spec, backend=None, threads=ref_threads, timeout=_timeout(args) * 3)[0]
            cpu_s = sum(w[2] for w in ref["windows"])
            raw["reference"] = {**summarize_rates(window_rates([ref["windows"]])),
                                "samples_per_cpu_s": sum(w[0] for w in ref["windows"]) / cpu_s if cpu_s else None,
                                **{k: v for k, v in ref.items() if k != "windows"}}
            log(f"  reference: {raw['reference']['samples_per_s']:,.0f} samples/s (windows {raw['reference']['windows']})")
        if want("interleaved"):
            raw["interleaved"] = interleaved(small, batch=args.batch, rounds=args.interleaved_rounds,
                                            threads=args.threads or cores(), timeout=_timeout(args) * 3)
        if want("inference"):
            raw["inference"] = inference_section(small, batch=args.eval_batch, batches=args.inference_batches,
                                                 rounds=args.interleaved_rounds, threads=args.threads or cores(),
                                                 timeout=_timeout(args) * 3)
        if want("ingest"):
            log("ingest: ParquetSplitReader alone, one epoch of one worker's share")
            raw["ingest"]["local_1w"] = _ingest(args, small, 1, args.batch, "local_1w")
            raw["ingest"]["local_2w"] = _ingest(args, small, 2, args.batch // 2, "local_2w")
        if want("s3"):
            from tests.s3server import local_s3_server

            with local_s3_server("tf4ctr-bench", set_env=False) as s3:
                s3_url = s3.url(f"bench-{args.rows_small}")
                log(f"local S3 server at {s3.endpoint_url}: writing {args.rows_small:,} rows with generate_synthetic")
                from data_tools.synthetic import generate_synthetic

                t0 = time.perf_counter()
                generate_synthetic(s3_url, rows=args.rows_small, fields=FIELDS, seed=SEED,
                                   storage_options=s3.storage_options)
                log(f"  uploaded in {time.perf_counter() - t0:.1f}s")
                raw["ingest"]["s3_1w"] = _ingest(args, s3_url, 1, args.batch, "s3_1w", s3.storage_options)
                raw["ingest"]["s3_1w"]["server"] = "moto ThreadedMotoServer in the benchmark process"
        if large:
            raw["train"]["table_wise_1w_large"] = _train(args, large, 1, "table_wise", "rowwise_adagrad",
                                                         "table_wise_1w_large")
        mm_end = measure_matmul(2048)
        mm_bf16 = measure_bf16_matmul(2048)
        raw["matmul_cpu"] = {
            "flops_per_s": max(mm_start["flops_per_s"], mm_end["flops_per_s"]),
            "bf16_flops_per_s": mm_bf16["flops_per_s"] if mm_bf16 else None, "bf16": mm_bf16,
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
        raise SystemExit(f"--gpu: no CUDA device visible (this torch: {torch.__version__})")
    workers = args.gpu_workers or torch.cuda.device_count()
    log(f"GPU: {workers} x {torch.cuda.get_device_name(0)}; matmul roofline (fp32, TF32, bf16)")
    mm = spawn(gpu_matmul_worker, 1, backend=None, threads=cores(), timeout=600)[0]
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
