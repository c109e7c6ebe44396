"""The per-worker training loop: epochs, evaluation, lr plateau, early stopping, best reload.

Runs inside every worker (a Ray Train worker or a plain torch.distributed process); the default
process group must already exist. Only rank 0 writes run files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.data.manifest import Manifest, load_manifest
from tf4ctr_dist.data.reader import ParquetSplitReader
from tf4ctr_dist.distributed.state import average_batchnorm_stats, restore, snapshot
from tf4ctr_dist.distributed.sharding import (
    EmbeddingPlacement,
    build_optimizer,
    describe_plan,
    resolve_placement,
    scale_lr,
    shard_model,
)
from tf4ctr_dist.metrics import difficulty_buckets, evaluate, gather_across_ranks
from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr
from tf4ctr_dist.train import runfiles
from tf4ctr_dist.train.logs import quiet_library_logs

logger = logging.getLogger("tf4ctr_dist")


@dataclass
class EarlyStopping:
    """The published protocol: mode max, improvement means > best + 1e-6; otherwise decay lr
    and count; stop when the count reaches ``patience``."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Returns True when ``score`` improved on the best so far."""
        if score > self.best + 1e-6:
            self.best, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict], None] = lambda metrics: None  # e.g. ray.train.report


def _log(ctx: WorkerContext, msg: str) -> None:
    if ctx.rank == 0:
        print(f"[tf4ctr] {msg}", flush=True)


def _set_threads(cfg: RunConfig) -> None:
    threads = cfg.train.intra_op_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.cluster.workers))
    torch.set_num_threads(threads)


def check_run_config(cfg: RunConfig, device_type: str, world_size: int) -> EmbeddingPlacement:
    """Refuse impossible settings before any worker starts; returns the table placement."""
    if cfg.train.batch_size % world_size:
        raise ConfigError(
            f"batch_size={cfg.train.batch_size} (global) must divide evenly across {world_size} workers"
        )
    placement = resolve_placement(cfg.train.sharding, cfg.train.embedding_optimizer, device_type)
    if placement.fused and cfg.train.emb_reg > 0 and cfg.train.emb_reg_mode == "full":
        raise ConfigError(
            "emb_reg_mode=full (penalty over all rows every step) needs data-parallel tables; fused "
            "sharded tables only update looked-up rows. Use emb_reg_mode=touched or sharding=data_parallel"
        )
    return placement


def train_worker(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train, evaluate and (rank 0) write RUN_DIR files; returns the result dict on every rank."""
    quiet_library_logs()
    _set_threads(cfg)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    manifest = load_manifest(cfg.data.url)
    fields = [(f.name, f.vocab_size) for f in manifest.fields]
    sequences = {f.name for f in manifest.fields if f.kind == "sequence"}
    tables = embedding_tables(fields, cfg.model, sequences)

    placement = check_run_config(cfg, ctx.device.type, ctx.world_size)
    local_batch = cfg.train.batch_size // ctx.world_size
    eval_local_batch = max(1, cfg.train.eval_batch_size // ctx.world_size)
    emb_lr = cfg.train.embedding_lr or cfg.train.lr
    fused_decay = cfg.train.emb_reg if placement.fused else 0.0

    module = TF4CTRTrain(tf4ctr(fields, cfg.model, device="meta", mean_pooled=sequences), Objective(cfg.loss))
    dmp, plan = shard_model(
        module,
        tables,
        placement,
        device=ctx.device,
        embedding_lr=emb_lr,
        embedding_weight_decay=fused_decay,
        local_batch_size=local_batch,
    )
    optimizer = build_optimizer(
        dmp,
        lr=cfg.train.lr,
        embedding_lr=emb_lr,
        emb_reg=cfg.train.emb_reg,
        emb_reg_mode=cfg.train.emb_reg_mode,
        clip_grad_norm=cfg.train.clip_grad_norm,
        clip_embeddings=cfg.train.clip_embeddings,
    )
    plan_text = describe_plan(plan, tables, ctx.world_size)
    n_dense = sum(p.numel() for n, p in module.named_parameters() if "embedding_bags" not in n)
    n_emb = sum(t.num_embeddings * t.embedding_dim for t in tables)
    _log(ctx, f"{ctx.world_size} worker(s) on {ctx.device.type}; {placement.describe()}")
    _log(ctx, f"parameters: {n_emb:,} embedding + {n_dense:,} dense = {n_emb + n_dense:,}")
    _log(ctx, plan_text)

    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device, execute_all_batches=True)
    readers = {
        split: ParquetSplitReader(
            cfg.data.url,
            split,
            manifest=manifest,
            rank=ctx.rank,
            world_size=ctx.world_size,
            local_batch_size=local_batch if split == cfg.data.train_split else eval_local_batch,
            shuffle=cfg.data.shuffle and split == cfg.data.train_split,
            seed=cfg.train.seed,
            shuffle_buffer_row_groups=1,
            shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
            pad_tail=split != cfg.data.train_split,
        )
        for split in (cfg.data.train_split, cfg.data.valid_split, cfg.data.test_split)
        if split in manifest.splits
    }
    run = runfiles.RunDir(cfg.out, enabled=ctx.rank == 0)
    run.write_json("config.json", cfg.to_dict())
    run.write_text("plan.txt", plan_text + "\n" + placement.describe() + "\n")

    monitor = [m for m in cfg.train.monitor if m != "gAUC" or manifest.group]
    stopper = EarlyStopping(cfg.train.patience)
    best_state: Optional[dict] = None
    history: list[dict] = []
    lr = cfg.train.lr
    train_reader = readers[cfg.data.train_split]
    for epoch in range(cfg.train.epochs):
        t0 = time.perf_counter()
        dmp.train()
        stats = _train_epoch(pipeline, train_reader, epoch, ctx, cfg.train.log_every)
        pipeline.detach()
        average_batchnorm_stats(dmp)
        train_s = time.perf_counter() - t0
        valid = evaluate_split(dmp, readers[cfg.data.valid_split], ctx, manifest)
        score = sum(valid[m] for m in monitor)
        improved = stopper.update(score, epoch)
        record = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_samples": stats["samples"],
                  "train_seconds": round(train_s, 2), "samples_per_s": round(stats["samples"] / train_s, 1),
                  "lr": lr, "valid": valid, "improved": improved}
        history.append(record)
        run.append_jsonl("metrics.jsonl", record)
        ctx.report({"epoch": epoch + 1, **{f"valid_{k}": v for k, v in valid.items() if not isinstance(v, dict)}})
        _log(ctx, f"epoch {epoch + 1}: train loss {stats['loss']:.5f} ({stats['samples'] / train_s:,.0f} samples/s) "
                  f"valid {_fmt(valid)}{'  *best*' if improved else ''}")
        if improved:
            best_state = snapshot(dmp)
        else:
            lr = scale_lr(optimizer, cfg.train.lr_decay, cfg.train.min_lr)
            _log(ctx, f"no improvement; lr -> {lr:g} ({stopper.bad_epochs}/{stopper.patience})")
            if stopper.should_stop:
                _log(ctx, f"early stop after epoch {epoch + 1}; best epoch {stopper.best_epoch + 1}")
                break
    if best_state is not None:
        restore(dmp, best_state)
    result: dict[str, Any] = {"epochs": len(history), "best_epoch": stopper.best_epoch + 1}
    for name, split in (("valid", cfg.data.valid_split), ("test", cfg.data.test_split)):
        if split in readers:
            metrics = evaluate_split(dmp, readers[split], ctx, manifest, with_buckets=True)
            result[name] = {k: v for k, v in metrics.items() if k != "difficulty"}
            result[f"{name}_difficulty"] = metrics.get("difficulty")
    result["config"] = cfg.to_dict()
    result["embedding_placement"] = placement.describe()
    result["history"] = history
    run.write_json("result.json", result)
    _log(ctx, f"best epoch {result['best_epoch']}: valid {_fmt(result['valid'])}")
    if "test" in result:
        _log(ctx, f"test {_fmt(result['test'])}")
    return result


def _fmt(m: dict) -> str:
    return " ".join(f"{k} {v:.6f}" for k, v in m.items() if isinstance(v, float))


def _train_epoch(pipeline, reader: ParquetSplitReader, epoch: int, ctx: WorkerContext, log_every: int) -> dict:
    total = reader.num_batches(epoch)
    it: Iterator = reader.iter_epoch(epoch)
    loss_sum = torch.zeros((), dtype=torch.float64)
    samples = 0
    step = 0
    t0 = time.perf_counter()
    while True:
        try:
            loss, _, _, valid = pipeline.progress(it)
        except StopIteration:
            break
        step += 1
        loss_sum += loss.detach().double()
        samples += int(valid.sum())
        if log_every and step % log_every == 0:
            rate = samples / (time.perf_counter() - t0)
            _log(ctx, f"epoch {epoch + 1} step {step}/{total} loss {float(loss):.5f} ({rate:,.0f} samples/s/worker)")
    # Every rank ran the same steps; report the mean loss and the global sample count.
    agg = torch.tensor([float(loss_sum), float(step), float(samples)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(agg)
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
