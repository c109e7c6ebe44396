"""The per-worker training loop: epochs, evaluation, lr plateau, early stopping, best reload.

Runs inside every worker (a Ray Train worker or a plain torch.distributed process); the default
process group must already exist. Only rank 0 writes run files.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.reader import ParquetSplitReader
from tf4ctr_dist.distributed.placement import check_run_config  # noqa: F401  (historical import path)
from tf4ctr_dist.distributed.sharding import scale_lr
from tf4ctr_dist.distributed.state import average_batchnorm_stats, restore, snapshot
from tf4ctr_dist.metrics import difficulty_buckets, evaluate, gather_across_ranks
from tf4ctr_dist.train import faults, runfiles
from tf4ctr_dist.train.resume import Checkpointing, EarlyStopping, EpochSums, Progress, SampleCounter
from tf4ctr_dist.train.logs import quiet_library_logs
from tf4ctr_dist.train.setup import build_training, set_threads

logger = logging.getLogger("tf4ctr_dist")


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict], None] = lambda metrics: None  # e.g. ray.train.report


def _log(ctx: WorkerContext, msg: str) -> None:
    if ctx.rank == 0:
        print(f"[tf4ctr] {msg}", flush=True)


def train_worker(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train, evaluate and (rank 0) write RUN_DIR files; returns the result dict on every rank.

    With checkpoints enabled (the default) the run resumes from the newest committed checkpoint
    under ``checkpoint.root`` (a restarted worker group or a re-launched job with the same OUT
    continues exactly where it stopped), and the best weights are reloaded from their checkpoint
    at the end instead of being held in memory.
    """
    quiet_library_logs()
    set_threads(cfg)
    parts = build_training(cfg, ctx.rank, ctx.world_size, ctx.device)
    manifest, dmp, optimizer, pipeline, readers = (parts.manifest, parts.dmp, parts.optimizer, parts.pipeline,
                                                   parts.readers)
    placement, plan_text = parts.placement, parts.plan_text
    n_emb, n_dense = parts.parameter_counts
    _log(ctx, f"{ctx.world_size} worker(s) on {ctx.device.type}; {placement.describe()}")
    _log(ctx, f"parameters: {n_emb:,} embedding + {n_dense:,} dense = {n_emb + n_dense:,}")
    _log(ctx, plan_text if cfg.verbose else parts.plan_summary + f"\n(the whole plan: {cfg.out.rstrip('/')}/plan.txt)")

    run = runfiles.RunDir(cfg.out, enabled=ctx.rank == 0)
    run.write_json("config.json", cfg.to_dict())
    run.write_text("plan.txt", plan_text + "\n" + placement.describe() + "\n")

    monitor = [m for m in cfg.train.monitor if m != "gAUC" or manifest.group]
    train_reader = readers[cfg.data.train_split]
    counter = SampleCounter(manifest.splits[cfg.data.train_split].rows) if cfg.checkpoint.count_samples else None
    ckpt = Checkpointing(cfg, ctx, dmp, optimizer, plan_text) if cfg.checkpoint.enabled else None
    progress = Progress(lr=cfg.train.lr, stopper=EarlyStopping(cfg.train.patience))
    carry = EpochSums()
    if ckpt is not None:
        resumed = ckpt.resume(progress, counter)
        if resumed is not None:
            carry = resumed
            run.write_jsonl("metrics.jsonl", progress.history)  # drops lines of epochs being redone
        elif cfg.checkpoint.warm_start:
            ckpt.warm_start(cfg.checkpoint.warm_start)
    best_state: Optional[dict] = None

    while not progress.finished and progress.epoch < cfg.train.epochs:
        epoch = progress.epoch
        t0 = time.perf_counter()
        dmp.train()
        stats = _train_epoch(pipeline, train_reader, epoch, ctx, cfg, carry, counter, ckpt, progress)
        carry = EpochSums()
        pipeline.detach()
        average_batchnorm_stats(dmp)
        train_s = time.perf_counter() - t0
        valid = evaluate_split(dmp, readers[cfg.data.valid_split], ctx, manifest)
        score = sum(valid[m] for m in monitor)
        improved = progress.stopper.update(score, epoch)
        record = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_samples": stats["samples"],
                  "train_seconds": round(train_s, 2), "samples_per_s": round(stats["samples"] / train_s, 1),
                  "lr": progress.lr, "valid": valid, "improved": improved}
        if counter is not None:
            record["sample_use"] = counter.summary_and_reset()
        progress.history.append(record)
        run.append_jsonl("metrics.jsonl", record)
        ctx.report({"epoch": epoch + 1, **{f"valid_{k}": v for k, v in valid.items() if not isinstance(v, dict)}})
        _log(ctx, f"epoch {epoch + 1}: train loss {stats['loss']:.5f} ({stats['samples'] / train_s:,.0f} samples/s) "
                  f"valid {_fmt(valid)}{'  *best*' if improved else ''}")
        if improved:
            if ckpt is None:
                best_state = snapshot(dmp)
        else:
            progress.lr_scale *= cfg.train.lr_decay
            progress.lr = scale_lr(optimizer, cfg.train.lr_decay, cfg.train.min_lr)
            _log(ctx, f"no improvement; lr -> {progress.lr:g} ({progress.stopper.bad_epochs}/{progress.stopper.patience})")
            if progress.stopper.should_stop:
                _log(ctx, f"early stop after epoch {epoch + 1}; best epoch {progress.stopper.best_epoch + 1}")
                progress.finished = True
        progress.epoch, progress.step = epoch + 1, 0
        progress.finished = progress.finished or progress.epoch >= cfg.train.epochs
        if ckpt is not None:
            ckpt.save(progress, EpochSums(), counter, best=improved)

    if ckpt is not None:
        ckpt.load_best()
    elif best_state is not None:
        restore(dmp, best_state)
    stopper = progress.stopper
    result: dict[str, Any] = {"epochs": len(progress.history), "best_epoch": stopper.best_epoch + 1}
    for name, split in (("valid", cfg.data.valid_split), ("test", cfg.data.test_split)):
        if split in readers:
            metrics = evaluate_split(dmp, readers[split], ctx, manifest, with_buckets=True)
            result[name] = {k: v for k, v in metrics.items() if k != "difficulty"}
            result[f"{name}_difficulty"] = metrics.get("difficulty")
    result["config"] = cfg.to_dict()
    result["embedding_placement"] = placement.describe()
    result["cpu_kernels"] = parts.cpu_kernels
    result["history"] = progress.history
    run.write_json("result.json", result)
    _log(ctx, f"best epoch {result['best_epoch']}: valid {_fmt(result['valid'])}")
    if "test" in result:
        _log(ctx, f"test {_fmt(result['test'])}")
    return result


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.6f}" for k, v in m.items() if isinstance(v, float))


class _Tracked:
    """Iterator over batches that remembers, in order, the sample ids of the batches the
    pipeline has taken but not yet trained (it reads ahead), so each step can be attributed."""

    def __init__(self, it: Iterator) -> None:
        self.it = it
        self.pending: deque = deque()

    def __iter__(self) -> "_Tracked":
        return self

    def __next__(self):
        batch = next(self.it)
        self.pending.append(batch.sample_ids[batch.valid > 0])
        return batch


def _train_epoch(pipeline, reader: ParquetSplitReader, epoch: int, ctx: WorkerContext, cfg: RunConfig,
                 sums: "EpochSums", counter: Optional["SampleCounter"], ckpt: Optional["Checkpointing"],
                 progress: "Progress") -> dict:
    """Train batches progress.step.. of ``epoch``; ``sums`` carries the partial sums of a
    resumed epoch. Checkpoints every ``checkpoint.every_steps`` batches."""
    total = reader.num_batches(epoch)
    start = progress.step
    tracked = _Tracked(reader.iter_epoch(epoch, start_batch=start))
    every = cfg.checkpoint.every_steps if ckpt is not None else 0
    step = start
    t0 = time.perf_counter()
    samples_here = 0  # since this process started the epoch (sums may carry a resumed part)
    while True:
        try:
            loss, _, _, valid = pipeline.progress(tracked)
        except StopIteration:
            break
        step += 1
        ids = tracked.pending.popleft()
        if counter is not None:
            counter.add(ids)
        sums.loss += loss.detach().double()
        sums.steps += 1
        sums.samples += int(ids.numel())
        samples_here += int(ids.numel())
        faults.maybe_crash("step", epoch + 1, step, ctx.rank)
        if cfg.train.log_every and step % cfg.train.log_every == 0:
            rate = samples_here / max(time.perf_counter() - t0, 1e-9)
            _log(ctx, f"epoch {epoch + 1} step {step}/{total} loss {float(loss):.5f} ({rate:,.0f} samples/s/worker)")
        if every and step % every == 0 and step < total:
            progress.step = step
            ckpt.save(progress, sums, counter)
    # Every rank ran the same steps; report the mean loss and the global sample count.
    agg = torch.tensor([float(sums.loss), float(sums.steps), float(sums.samples)], dtype=torch.float64, device=ctx.device)
    if dist.is_initialized():
        dist.all_reduce(agg)  # on the default group: a CUDA tensor under nccl
    return {"loss": float(agg[0] / max(agg[1], 1)), "samples": int(agg[2])}


@torch.no_grad()
def evaluate_split(
    dmp: torch.nn.Module,
    reader: ParquetSplitReader,
    ctx: WorkerContext,
    manifest: Manifest,
    with_buckets: bool = False,
) -> dict[str, Any]:
    """Exact metrics over the whole split: every sample scored once, padding dropped, all ranks
    gathered (every rank gets the same numbers)."""
    dmp.eval()
    probs, labels, groups = [], [], []
    for batch in reader.iter_epoch(0):
        batch = batch.to(ctx.device)
        _, (_, p, y, _) = dmp(batch)
        keep = batch.valid > 0
        probs.append(p[keep].float().cpu())
        labels.append(y[keep].float().cpu())
        groups.append(batch.group_ids[keep].cpu())
    cat = lambda xs, dt: torch.cat(xs) if xs else torch.zeros(0, dtype=dt)  # noqa: E731
    p_all, y_all, g_all = gather_across_ranks(cat(probs, torch.float32), cat(labels, torch.float32), cat(groups, torch.int64))
    p_np, y_np, g_np = (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in (p_all, y_all, g_all))
    metrics = evaluate(y_np, p_np, g_np if manifest.group else None)
    metrics = {k: float(v) for k, v in metrics.items()}
    metrics["samples"] = int(y_np.size)
    if with_buckets:
        metrics["difficulty"] = difficulty_buckets(y_np, p_np)
    dmp.train()
    return metrics
