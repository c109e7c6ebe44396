"""The measuring processes, each started by `tf4ctr_dist.distributed.spawn.spawn`: training
through the real assembly (`build_training`), the plain reference, the reader alone, the GPU
matmul. Each returns plain figures; benchmarks/report.py turns them into rates and ratios.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

from benchmarks.probes import measure_matmul, rss_bytes
from benchmarks.report import split_windows, stage_name
from benchmarks.settings import CLIP, EMB_REG, FIELDS, LR, SEED, log, typed


def epochs_forever(reader) -> Iterator:
    """Batches of epoch 0, 1, 2, ... without end (the pipeline never sees StopIteration)."""
    for epoch in itertools.count():
        yield from reader.iter_epoch(epoch)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_windows(
    step: Callable[[], int], warmup: int, windows: int, per_window: int, device, label: str = ""
) -> list[tuple[int, float, float]]:
    """Run `warmup` untimed steps, then `windows` windows of `per_window` steps:
    [(samples, wall seconds, process CPU seconds)].
    With a `label`, prints one progress line after the warm-up and after every window."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    if label:
        log(f"  {label}: {warmup} warm-up steps in {time.perf_counter() - t0:.1f}s")
    out = []
    for w in range(windows):
        samples = 0
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(per_window):
            samples += step()
        sync(device)
        # (samples, wall s, process CPU s): CPU time is a load-insensitive diagnostic only
        out.append((samples, time.perf_counter() - t0, time.process_time() - c0))
        if label:
            log(f"  {label}: window {w + 1}/{windows}: {samples / out[-1][1]:,.0f} samples/s (this process)")
    return out


def kernel_use(parts) -> dict[str, bool]:
    """Which compiled CPU kernels this run's parts train with (from `build_training`'s record):
    the BatchNorm/ReLU/dropout one (float32 dense towers) and the table backward + row-wise
    Adagrad one (fused tables; in place of fbgemm's)."""
    return {"cpu_kernel": bool(parts.cpu_kernels["bn_relu_dropout"]),
            "table_kernel": parts.cpu_kernels["table_backward"] == "tf4ctr"}


def train_worker(rank: int, world: int, spec: dict) -> dict:
    """One training process: the parts of `build_training` (the function every training worker
    runs) from the benchmark's RunConfig, timed windows of `pipeline.progress`, RSS, optional
    eval and profile. spec: {"config": RunConfig dict, "device", "label", "warmup", "steps",
    "windows", "eval_batches", "eval_passes", "profile_steps", "tf32"}."""
    from tf4ctr_dist.train.logs import quiet_library_logs

    quiet_library_logs()
    import torch
    import torch.distributed as dist

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.distributed.sharding import describe_plan
    from tf4ctr_dist.train.setup import build_training

    t_start = time.perf_counter()
    device = torch.device("cuda", rank) if spec["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = spec.get("tf32", True)
        torch.backends.cudnn.allow_tf32 = spec.get("tf32", True)
    cfg = RunConfig.from_dict(spec["config"])
    want_eval = bool(spec.get("eval_batches", 0))
    parts = build_training(cfg, rank, world, device, splits=("train", "valid") if want_eval else ("train",))
    pipeline, reader = parts.pipeline, parts.readers["train"]
    it = epochs_forever(reader)
    parts.dmp.train()
    last: dict[str, Any] = {}

    def step() -> int:
        out = pipeline.progress(it)
        last["out"] = out
        return int(out[3].numel())  # real rows of this step (no padding in training); no device sync

    setup_s = time.perf_counter() - t_start
    if rank == 0:
        log(f"  {spec['label']}: set up in {setup_s:.1f}s ({parts.placement.describe()})")
    if world > 1:
        dist.barrier()
    n_windows, per_window = split_windows(spec["steps"], spec["windows"])
    t0 = time.perf_counter()
    windows = timed_windows(step, spec["warmup"], n_windows, per_window, device, spec["label"] if rank == 0 else "")
    loop_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "rank": rank,
        "windows": windows,
        "local_batch": parts.local_batch,
        "setup_s": setup_s,
        "loop_s": loop_s,
        "threads": torch.get_num_threads(),
        "concurrent_table_backward": parts.module.model.concurrent_table_backward,
        # cpu_kernel: whether float32 training ran the compiled BatchNorm/ReLU/dropout kernel;
        # table_kernel: whether the fused tables' backward + row-wise Adagrad ran the compiled one
        **kernel_use(parts),
        "final_loss": float(last["out"][0].float().cpu()),
        **rss_bytes(),
    }
    if rank == 0:
        result["placement"] = parts.placement.describe()
        result["plan"] = describe_plan(parts.plan, parts.tables, world)
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    if spec.get("profile_steps"):  # every rank steps (collectives); rank 0 reports
        prof = profile_steps(step, spec["profile_steps"], device)
        if rank == 0:
            result["profile"] = prof
    pipeline.detach()
    reader.close()
    if want_eval:
        result["eval"] = eval_rate(parts.dmp, parts.readers["valid"], spec, world, device)
    return result

def profile_steps(step: Callable[[], int], steps: int, device) -> dict:
    """torch.profiler over `steps` training steps: top ops by self CPU time, pipeline stages."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
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


def eval_rate(dmp, reader, spec: dict, world: int, device) -> dict:
    """Eval-mode DMP forward on preloaded valid batches (ingest excluded): median of passes."""
    import torch

    with reader:
        batches = [b.to(device) for b in itertools.islice(reader.iter_epoch(0), spec["eval_batches"])]
    dmp.eval()
    rates = []
    with torch.no_grad():
        for b in batches[:1]:
            dmp(b)
        sync(device)
        for _ in range(spec.get("eval_passes", 3)):
            t0 = time.perf_counter()
            n = 0
            for b in batches:
                dmp(b)
                n += int(b.valid.numel())
            sync(device)
            rates.append(n * world / (time.perf_counter() - t0))
    dmp.train()
    return {"samples_per_s": statistics.median(rates), "passes": rates, "batch": reader.local_batch_size * world,
            "batches": len(batches)}


def load_rows(url: str, manifest, rows: int, batch: int, seed: int):
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


def reference_worker(rank: int, world: int, spec: dict) -> dict:
    """The plain single-process baseline: per-field nn.Embedding, dense Adam, full-table L2."""
    import torch

    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(spec["url"])
    ref_step, rows_in_memory = reference_stepper(spec, manifest, spec["warmup"] + spec["steps"])
    last: dict[str, Any] = {}

    def step() -> int:
        (last["loss"],) = ref_step()
        return min(spec["batch"], rows_in_memory)

    n_windows, per_window = split_windows(spec["steps"], spec["windows"])
    windows = timed_windows(step, spec["warmup"], n_windows, per_window, torch.device("cpu"), "reference")
    return {"windows": windows, "threads": torch.get_num_threads(), "rows_in_memory": rows_in_memory,
            "embedding_rows": sum(f.vocab_size for f in manifest.fields), "final_loss": float(last["loss"]),
            **rss_bytes()}


def ingest_worker(rank: int, world: int, spec: dict) -> dict:
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


def reference_stepper(spec: dict, manifest, steps: int) -> tuple[Callable[[], tuple], int]:
    """(step, rows held): ReferenceTF4CTR + ReferenceStep over the first rows of the shuffled train
    stream, enough for `steps` batches, held in memory and cycled; step() -> (loss,)."""
    import torch

    from benchmarks.reference import ReferenceStep, ReferenceTF4CTR

    batch = spec["batch"]
    torch.manual_seed(spec["seed"])
    ids, labels = load_rows(spec["url"], manifest, min(manifest.split("train").rows, batch * steps), batch, spec["seed"])
    model_cfg, loss_cfg = typed(spec["model"], spec["loss"])
    model = ReferenceTF4CTR([f.vocab_size for f in manifest.fields], model_cfg)
    model.train()
    ref_step = ReferenceStep(model, loss_cfg, emb_reg=EMB_REG, clip=CLIP, lr=LR)
    pos = {"i": 0}

    def step() -> tuple:
        i = pos["i"] if pos["i"] + batch <= len(ids) else 0
        pos["i"] = i + batch
        return (ref_step(ids[i : i + batch], labels[i : i + batch]).detach(),)

    return step, len(ids)


def gpu_matmul_worker(rank: int, world: int) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = measure_matmul(8192, reps=10, device="cuda", dtype="float32")
    torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = measure_matmul(8192, reps=20, device="cuda", dtype="float32")
    bf16 = measure_matmul(8192, reps=50, device="cuda", dtype="bfloat16")
    tf32_model = measure_matmul(device="cuda", dtype="float32", reps=50, shape=(65536, 624, 400))
    return {"fp32": fp32, "tf32": tf32, "bf16": bf16, "tf32_model_shape": tf32_model,
            "name": torch.cuda.get_device_name(0)}


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
