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
from tf4ctr_dist.progress import FIRST_LINE_SECONDS, duration, line_seconds
from tf4ctr_dist.studies.analyses import TELEMETRY_WINDOWS_PER_EPOCH, DifficultyTelemetry, Histogram, Probes
from tf4ctr_dist.studies.tensorboard import RunBoard
from tf4ctr_dist.train import faults, runfiles
from tf4ctr_dist.train.resume import Checkpointing, EarlyStopping, EpochSums, Progress, SampleCounter
from tf4ctr_dist.train.logs import quiet_library_logs
from tf4ctr_dist.train.setup import build_training, numerics_record, set_threads

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
    probes = Probes(parts.module, cfg.train.analyses)
    board = RunBoard(cfg.out, enabled=ctx.rank == 0 and cfg.train.tensorboard)

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
        train_hist = Histogram() if probes.wants("histograms") else None
        if probes.grad_norms is not None:
            probes.grad_norms.enabled = epoch == 0  # Fig 5: the first epoch
        stats = _train_epoch(pipeline, train_reader, epoch, ctx, cfg, carry, counter, ckpt, progress,
                             train_hist=train_hist, board=board, telemetry=probes.telemetry)
        carry = EpochSums()
        pipeline.detach()
        average_batchnorm_stats(dmp)
        train_s = time.perf_counter() - t0
        t_valid = time.perf_counter()
        valid = evaluate_split(dmp, readers[cfg.data.valid_split], ctx, manifest, with_buckets=probes.wants("buckets"),
                               probes=probes)
        valid_s = time.perf_counter() - t_valid
        extras = _epoch_analyses(valid, train_hist, probes, dmp, readers, ctx, manifest, cfg)
        score = sum(valid[m] for m in monitor)
        improved = progress.stopper.update(score, epoch)
        record = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_samples": stats["samples"],
                  "train_seconds": round(train_s, 2), "samples_per_s": round(stats["samples"] / train_s, 1),
                  "valid_seconds": round(valid_s, 3), "lr": progress.lr, "valid": valid, "improved": improved}
        if extras:
            record["analyses"] = extras
        if counter is not None:
            record["sample_use"] = counter.summary_and_reset()
        progress.history.append(record)
        run.append_jsonl("metrics.jsonl", record)
        _board_epoch(board, record)
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
    result["numerics"] = numerics_record(ctx.device)
    result["history"] = progress.history
    first = progress.history[0] if progress.history else {}
    # Table 6: the first epoch's training time and one inference pass over valid.
    result["timing"] = {"first_epoch_train_seconds": first.get("train_seconds"),
                        "valid_inference_seconds": first.get("valid_seconds")}
    board.close()
    run.write_json("result.json", result)
    _log(ctx, f"best epoch {result['best_epoch']}: valid {_fmt(result['valid'])}")
    if "test" in result:
        _log(ctx, f"test {_fmt(result['test'])}")
    return result


def _epoch_analyses(valid: dict, train_hist: Optional[Histogram], probes: Probes, dmp, readers: dict,
                    ctx: WorkerContext, manifest: Manifest, cfg: RunConfig) -> dict[str, Any]:
    """Move the analysis parts out of ``valid`` (left with its metrics) and add the others.

    Every rank runs this (collectives inside); returns what metrics.jsonl's "analyses" holds."""
    extras: dict[str, Any] = {}
    for key in ("difficulty", "histogram", "fusion"):
        if key in valid:
            extras[f"valid_{key}"] = valid.pop(key)
    if "valid_fusion" in extras:
        extras["fusion"] = extras.pop("valid_fusion")
    if probes.wants("test_buckets") and cfg.data.test_split in readers:
        test = evaluate_split(dmp, readers[cfg.data.test_split], ctx, manifest, with_buckets=True)
        extras["test_difficulty"] = test.pop("difficulty")
        extras["test"] = test
    if train_hist is not None:
        extras["train_histogram"] = train_hist.result()
    if probes.grad_norms is not None and probes.grad_norms.enabled:
        extras["grad_norms"] = probes.grad_norms.take()  # rank 0's local batches
        probes.grad_norms.enabled = False
    if probes.telemetry is not None:
        extras["telemetry"] = probes.telemetry.epoch_result()  # windows of the steps this process ran
    return extras


def _board_epoch(board: RunBoard, record: dict) -> None:
    """One epoch's record in TensorBoard: metrics, timing, histograms, fusion values, grad norms."""
    if not board.enabled:
        return
    e = record["epoch"]
    board.scalars("valid", record["valid"], e)
    board.scalar("epoch/train_loss", record["train_loss"], e)
    board.scalar("epoch/samples_per_s", record["samples_per_s"], e)
    board.scalar("epoch/train_seconds", record["train_seconds"], e)
    board.scalar("epoch/valid_seconds", record["valid_seconds"], e)
    board.scalar("epoch/lr", record["lr"], e)
    a = record.get("analyses", {})
    board.scalars("test", a.get("test", {}), e)
    for split in ("valid", "test"):
        for label, row in (a.get(f"{split}_difficulty") or {}).items():
            board.scalars(f"difficulty_{split}/{label}", {k: v for k, v in row.items() if k.endswith("_frac")}, e)
    for split in ("train", "valid"):
        h = a.get(f"{split}_histogram")
        if h:
            for label in ("positive", "negative"):
                board.histogram(f"predictions_{split}/{label}", h["edges"], h[label], e)
    for name, v in (a.get("fusion") or {}).items():
        if "mean" in v:
            for i, m in enumerate(v["mean"]):
                board.scalar(f"fusion/{name}_{i}", m, e)
        else:
            board.scalars(f"fusion/{name}", v, e)
    for branch, norms in (a.get("grad_norms") or {}).items():
        for i, n in enumerate(norms):
            board.scalar(f"grad_norm_first_epoch/{branch}", n, i + 1)
    board.flush()


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.6f}" for k, v in m.items() if isinstance(v, float))


LINE_SECONDS_TTY = 30.0
LINE_SECONDS_LOG = 300.0
BOARD_EVERY_STEPS = 10  # train loss to TensorBoard (a float() per write: a device sync on GPU)


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
                 progress: "Progress", train_hist: Optional[Histogram] = None,
                 board: Optional[RunBoard] = None, telemetry: Optional[DifficultyTelemetry] = None) -> dict:
    """Train batches progress.step.. of ``epoch``; ``sums`` carries the partial sums of a
    resumed epoch. Checkpoints every ``checkpoint.every_steps`` batches. ``train_hist`` counts
    the training predictions (Fig 2); ``board`` gets the loss and throughput (rank 0);
    ``telemetry`` closes a window every tenth of the epoch (its values go to ``board`` at once)."""
    total = reader.num_batches(epoch)
    window = max(1, -(-total // TELEMETRY_WINDOWS_PER_EPOCH))
    if telemetry is not None:
        telemetry.enabled = True
    start = progress.step
    tracked = _Tracked(reader.iter_epoch(epoch, start_batch=start))
    every = cfg.checkpoint.every_steps if ckpt is not None else 0
    step = start
    t0 = time.perf_counter()
    samples_here = 0  # since this process started the epoch (sums may carry a resumed part)
    # A first progress line within seconds of the epoch start, then by log_every or by time
    # (sparser when the output is not a terminal, e.g. CI logs).
    next_line = t0 + FIRST_LINE_SECONDS
    line_gap = line_seconds(LINE_SECONDS_TTY, LINE_SECONDS_LOG)
    while True:
        try:
            loss, probs, labels, valid = pipeline.progress(tracked)
        except StopIteration:
            break
        if train_hist is not None:
            train_hist.add(probs, labels, valid)
        step += 1
        ids = tracked.pending.popleft()
        if counter is not None:
            counter.add(ids)
        sums.loss += loss.detach().double()
        sums.steps += 1
        sums.samples += int(ids.numel())
        samples_here += int(ids.numel())
        faults.maybe_crash("step", epoch + 1, step, ctx.rank)
        now = time.perf_counter()
        if cfg.train.log_every and (step % cfg.train.log_every == 0 or now >= next_line):
            next_line = now + line_gap
            elapsed = max(now - t0, 1e-9)
            rate = samples_here / elapsed
            eta = (total - step) * elapsed / max(step - start, 1)
            _log(ctx, f"epoch {epoch + 1} step {step}/{total} loss {float(loss):.5f} ({rate:,.0f} samples/s/worker, "
                      f"epoch ETA {duration(eta)})")
        if board is not None and board.enabled and step % BOARD_EVERY_STEPS == 0:
            global_step = epoch * total + step
            board.scalar("train/loss", float(loss), global_step)
            board.scalar("train/samples_per_s_per_worker", samples_here / max(now - t0, 1e-9), global_step)
            board.scalar("train/lr", progress.lr, global_step)
        if telemetry is not None and (step % window == 0 or step == total):
            live = telemetry.window_result(step)
            if live is not None and board is not None and board.enabled:
                global_step = epoch * total + step
                board.scalars("telemetry", {k: v for k, v in live.items() if k not in ("step", "samples")},
                              global_step)
        if every and step % every == 0 and step < total:
            progress.step = step
            ckpt.save(progress, sums, counter)
    if telemetry is not None:
        telemetry.enabled = False  # evaluation passes are not training samples
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
    probes: Optional[Probes] = None,
) -> dict[str, Any]:
    """Exact metrics over the whole split: every sample scored once, padding dropped, all ranks
    gathered (every rank gets the same numbers). With ``probes``: also the prediction
    "histogram" and the "fusion" values the probes ask for."""
    dmp.eval()
    fusion = probes.fusion if probes is not None else None
    if fusion is not None:
        fusion.active = True
    probs, labels, groups = [], [], []
    for batch in reader.iter_epoch(0):
        batch = batch.to(ctx.device)
        _, (_, p, y, _) = dmp(batch)
        keep = batch.valid > 0
        if fusion is not None:
            fusion.keep(keep)
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
    if probes is not None and probes.wants("histograms"):
        hist = Histogram()
        hist.add(torch.from_numpy(np.asarray(p_np, dtype=np.float32)), torch.from_numpy(np.asarray(y_np)))
        metrics["histogram"] = {"edges": np.linspace(0.0, 1.0, hist.bins + 1).round(6).tolist(),
                                "negative": hist.counts[0].long().tolist(), "positive": hist.counts[1].long().tolist()}
    if fusion is not None:
        fusion.active = False
        metrics["fusion"] = fusion.result()
    dmp.train()
    return metrics
