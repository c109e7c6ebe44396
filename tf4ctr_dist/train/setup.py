"""The training assembly, written once: manifest -> tables -> placement -> model -> shard ->
optimizer -> pipeline -> readers.

`build_training` is what every worker runs before its first step; the worker loop, retraining
and the benchmarks all take their parts from it, so a change to how a run is put together
happens in one place. It runs inside a worker: the default process group must exist.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from tf4ctr_dist.config import ConfigError, RunConfig
from tf4ctr_dist.data.manifest import Manifest, load_manifest
from tf4ctr_dist.data.validate import check_label_classes
from tf4ctr_dist.data.reader import ParquetSplitReader
from tf4ctr_dist.distributed.batch_norm import use_cross_worker_batch_norm
from tf4ctr_dist.distributed.placement import EmbeddingPlacement, check_run_config, check_table_weight_decay
from tf4ctr_dist.distributed.sharding import build_optimizer, describe_plan, shard_model, summarize_plan
from tf4ctr_dist.distributed.table_kernel import uses_table_kernel
from tf4ctr_dist.kernels import CpuKernels, load
from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, model_for_dataset
from tf4ctr_dist.modules.mlp import cpu_has_fast_bf16


@dataclass
class TrainingParts:
    """Everything a worker trains and evaluates with."""

    manifest: Manifest
    tables: list  # the EmbeddingBagConfigs of every table set
    placement: EmbeddingPlacement
    module: TF4CTRTrain  # before wrapping (its .model is the TF4CTR that runs)
    dmp: torch.nn.Module  # DistributedModelParallel(module)
    plan: object  # TorchRec ShardingPlan
    optimizer: object  # KeyedOptimizer: fused tables + dense Adam with penalty and clip hooks
    pipeline: object  # TrainPipelineSparseDist
    readers: dict[str, ParquetSplitReader]  # split name -> this rank's reader
    plan_text: str  # what plan.txt says: tables per rank, kernels, dtypes
    plan_summary: str  # a few console lines: tables per sharding type and rank, kernels
    local_batch: int
    cpu_kernels: dict  # what ran: {"setting", "bn_relu_dropout", "table_backward"} (result.json)

    @property
    def parameter_counts(self) -> tuple[int, int]:
        """(embedding, dense) parameters of the whole model (all table sets, all ranks)."""
        dense = sum(p.numel() for n, p in self.module.named_parameters() if "embedding_bags" not in n)
        return sum(t.num_embeddings * t.embedding_dim for t in self.tables), dense


def set_threads(cfg: RunConfig) -> int:
    """Intra-op threads per worker: ``train.intra_op_threads``, or the cores shared evenly."""
    threads = cfg.train.intra_op_threads or max(1, (os.cpu_count() or 1) // max(1, cfg.cluster.workers))
    torch.set_num_threads(threads)
    return threads


def numerics_record(device: torch.device) -> dict:
    """What decides a worker's floating-point results besides the seed and the config (result.json
    ``numerics``): two runs of one seed train the same model where these agree."""
    record = {"device": device.type, "torch": torch.__version__, "intra_op_threads": torch.get_num_threads()}
    if device.type == "cpu":
        record.update(cpu_capability=torch.backends.cpu.get_cpu_capability(),
                      mkl_cbwr=os.environ.get("MKL_CBWR", "native"), cpu=_cpu_model())
    return record


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return platform.processor() or "unknown"


def load_cpu_kernels(cfg: RunConfig, placement: EmbeddingPlacement,
                     device: torch.device) -> tuple[Optional[CpuKernels], dict]:
    """The compiled kernels for ``train.cpu_kernels`` on ``device`` and the record of what runs.

    On a GPU they are not loaded (they are CPU kernels; fbgemm's GPU kernels apply weight decay).
    Refuses (ConfigError) a run whose fused CPU tables would lose their weight decay to fbgemm's
    kernel because this package's could not be built here (``auto`` on a machine without a
    compiler): the driver has already refused the cases it can know (``off``, adagrad/sgd)."""
    kernels = load(cfg.train.cpu_kernels) if device.type == "cpu" else None
    table_kernel = uses_table_kernel(placement, device, kernels)
    check_table_weight_decay(cfg, placement, device.type, table_kernel)
    record = {
        "setting": cfg.train.cpu_kernels,
        # float32 only: with dense_precision=bf16 the eager ops run
        "bn_relu_dropout": kernels is not None and cfg.model.dense_precision == "fp32",
        # fused tables: whose backward + optimizer kernel; data-parallel ones: torch's autograd and optimizer
        "table_backward": "tf4ctr" if table_kernel else "fbgemm" if placement.fused else "torch",
    }
    return kernels, record


def check_sync_batch_norm(cfg: RunConfig, module: torch.nn.Module) -> None:
    """Refuses (ConfigError) ``train.sync_batch_norm`` for a model without BatchNorm, where it
    would silently do nothing. The driver runs it on a model built on meta before launching
    (tf4ctr_dist.cli.train.check_before_launch), the workers again on the model they train."""
    if cfg.train.sync_batch_norm and not any(isinstance(m, torch.nn.BatchNorm1d) for m in module.modules()):
        raise ConfigError("train.sync_batch_norm=true, but this model has no BatchNorm layer "
                          "(model.batch_norm=false and no encoder with its own): drop the setting")


def apply_sync_batch_norm(cfg: RunConfig, module: torch.nn.Module, world_size: int) -> int:
    """With ``train.sync_batch_norm`` on several workers, make every BatchNorm layer of
    ``module`` (still on meta) normalise over the global batch; returns how many layers (0 when
    off, or with one worker, whose batch is already the global one). Refuses the setting for a
    model without BatchNorm (`check_sync_batch_norm`)."""
    check_sync_batch_norm(cfg, module)
    if not cfg.train.sync_batch_norm or world_size == 1:
        return 0
    return use_cross_worker_batch_norm(module)


def build_training(
    cfg: RunConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    manifest: Optional[Manifest] = None,
    storage_options: Optional[dict] = None,
    splits: Optional[tuple[str, ...]] = None,
) -> TrainingParts:
    """Assemble the sharded model, its optimizer, the train pipeline and this rank's readers.

    Seeds torch and numpy with ``train.seed`` first, so the dense weights (and with them the
    whole run) depend only on the config. ``splits`` limits which readers are opened (default:
    train, valid and test, where the dataset has them).
    """
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    manifest = manifest or load_manifest(cfg.data.url, storage_options, cfg.data.storage_retry_seconds)
    wanted = [s for s in splits or (cfg.data.train_split, cfg.data.valid_split, cfg.data.test_split)
              if s in manifest.splits]
    # Before any sharding work: an empty or one-class split would give NaN metrics at epoch end.
    # The scan stops at the first row group that holds both labels.
    check_label_classes(cfg.data.url, manifest, wanted, storage_options, cfg.data.storage_retry_seconds)
    fields = [(f.name, f.vocab_size) for f in manifest.fields]
    sequences, numeric = set(manifest.sequence_fields), set(manifest.numeric_fields)
    tables = embedding_tables(fields, cfg.model, sequences, numeric)

    placement = check_run_config(cfg, device.type, world_size)
    local_batch = cfg.train.batch_size // world_size
    eval_local_batch = max(1, cfg.train.eval_batch_size // world_size)
    emb_lr = cfg.train.embedding_lr or cfg.train.lr
    fused_decay = cfg.train.emb_reg if placement.fused else 0.0
    kernels, kernel_record = load_cpu_kernels(cfg, placement, device)

    module = TF4CTRTrain(model_for_dataset(manifest, cfg.model, device="meta", cpu_kernels=kernels),
                         Objective(cfg.loss))
    global_batch_norm = apply_sync_batch_norm(cfg, module, world_size)
    dmp, plan = shard_model(
        module,
        tables,
        placement,
        device=device,
        embedding_lr=emb_lr,
        embedding_weight_decay=fused_decay,
        local_batch_size=local_batch,
        table_precision=cfg.train.table_precision,
        table_kernel=kernels,
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
    plan_text = describe_plan(plan, tables, world_size)
    memory = plan_text.splitlines()[-1].strip()  # "table weights per rank: ..."
    notes = []
    # As allocated by the sharded kernels (table_precision=fp16 must show here).
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for k, v in dmp.state_dict().items() if "embedding_bags" in k})
    notes.append(f"table weight dtype: {', '.join(dtypes)}")
    if global_batch_norm:
        how = ("MLP blocks: the compiled kernel in halves around the pooling" if kernel_record["bn_relu_dropout"]
               else "eager ops")
        notes.append(f"BatchNorm statistics over the global batch of {cfg.train.batch_size} rows across "
                     f"{world_size} workers ({global_batch_norm} layers; {how})")
    notes.append(f"cpu_kernels={cfg.train.cpu_kernels}: BatchNorm/ReLU/dropout "
                 f"{'compiled kernel' if kernel_record['bn_relu_dropout'] else 'eager ops'}, table backward "
                 f"{kernel_record['table_backward']}")
    if kernel_record["table_backward"] == "tf4ctr":
        threads = torch.get_num_threads()
        notes.append(f"table backward: tf4ctr row-wise Adagrad kernel on {threads} intra-op "
                     f"thread{'s' if threads != 1 else ''} (in place of fbgemm's CPU kernel)")
    if device.type == "cpu" and "bf16" in (cfg.model.dense_precision, cfg.model.inference_precision) \
            and not cpu_has_fast_bf16():
        notes.append("bf16: this CPU has no bf16 dot products (AVX512-BF16 / AMX); the bf16 matmuls run "
                     "torch's portable path, several times slower than fp32")
    if module.model.concurrent_table_backward:
        notes.append(f"table backward: the two table sets on two threads ({torch.get_num_threads()} intra-op threads)")
    plan_text += "".join(f"\n  {n}" for n in notes)
    plan_summary = "\n".join([summarize_plan(plan, world_size), memory, *notes])

    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    pipeline = TrainPipelineSparseDist(dmp, optimizer, device, execute_all_batches=True)
    readers = {
        split: ParquetSplitReader(
            cfg.data.url,
            split,
            manifest=manifest,
            rank=rank,
            world_size=world_size,
            local_batch_size=local_batch if split == cfg.data.train_split else eval_local_batch,
            shuffle=cfg.data.shuffle and split == cfg.data.train_split,
            seed=cfg.train.seed,
            storage_options=storage_options,
            shuffle_buffer_row_groups=1,
            shuffle_buffer_rows=cfg.data.shuffle_buffer_rows,
            pad_tail=split != cfg.data.train_split,
            retry_seconds=cfg.data.storage_retry_seconds,
        )
        for split in wanted
    }
    return TrainingParts(manifest=manifest, tables=tables, placement=placement, module=module, dmp=dmp, plan=plan,
                         optimizer=optimizer, pipeline=pipeline, readers=readers, plan_text=plan_text,
                         plan_summary=plan_summary, local_batch=local_batch, cpu_kernels=kernel_record)
