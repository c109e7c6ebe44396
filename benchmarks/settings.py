"""What the benchmark trains: the model, loss and optimiser settings shared by every
measurement, the targets it reports against, and the RunConfig they make.

The training measurements build their parts with `tf4ctr_dist.train.setup.build_training`, the
function every training worker runs, from the RunConfig that `run_config` returns: the benchmark
times the path a user's run takes, not a copy of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FIELDS = 39
LOSS = {"loss": "tf", "alpha": 0.35, "c": 0.9, "gamma": 1.0}
LR = 1e-3
EMB_REG = 1e-5
CLIP = 10.0
EMB_LR = {"rowwise_adagrad": 0.05, "adagrad": 0.05, "sgd": 0.05, "adam": 1e-3}  # demo/criteo presets
SEED = 2026
DEFAULT_CACHE = ".tf4ctr-cache"
SECTIONS = ("train_1w", "train_bf16", "train_2w", "train_2w_sync_bn", "dp_adam", "reference", "interleaved", "inference", "ingest", "s3",
            "rss")

TARGETS = {
    # key in the report: (comparison, threshold, what)
    "ratio_vs_reference": (">=", 3.0, "ours (1 worker, batch 4096) / reference samples/s"),
    "ratio_vs_reference_interleaved": (">=", 3.0, "the same, measured round by round in one process"),
    "ratio_vs_reference_bf16_interleaved": (">=", 3.0, "the same with dense_precision=bf16, round by round"),
    "inference_vs_reference": (">=", 3.0, "ours' eval forward (fused, fp32) / the reference's, interleaved, batch 16384"),
    "roofline_share": (">=", 0.40, "achieved dense FLOP/s / measured fp32 matmul FLOP/s (1 worker)"),
    "ingest_vs_step": (">=", 10.0, "Parquet->Batch samples/s / training samples/s per worker"),
    "rss_10m_over_1m": ("<", 1.2, "peak worker RSS, large / small dataset"),
    "gpu_samples_per_s": (">=", 1_000_000.0, "GPU training samples/s (best batch)"),
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


def model_cfg() -> dict:
    """ModelConfig defaults as a dict: d=16, ser, wsf, MLP_s [400,400], MLP_c [400,400,400]."""
    from tf4ctr_dist.config import ModelConfig

    return dataclasses.asdict(ModelConfig())


def emb_reg_mode(sharding: str, optimizer: str, device_type: str = "cpu") -> str:
    """touched (fbgemm's L2 on looked-up rows) for fused tables, full (Adam's coupled weight
    decay on every row) for data-parallel ones: the only mode each placement can run."""
    from tf4ctr_dist.distributed.placement import resolve_placement

    return "touched" if resolve_placement(sharding, optimizer, device_type).fused else "full"


def run_config(
    url: str,
    *,
    workers: int,
    batch: int,
    sharding: str = "table_wise",
    optimizer: str = "rowwise_adagrad",
    eval_batch: int | None = None,
    model: dict | None = None,
    shuffle_buffer_rows: int | None = None,
    cpu_kernels: str = "auto",
    emb_reg: float = EMB_REG,
    device_type: str = "cpu",
    sync_batch_norm: bool = False,
) -> dict[str, Any]:
    """The benchmark's settings as a RunConfig dict (checked by `RunConfig.from_dict`; a dict so
    that it pickles into spawned workers and lands in the JSON as it is)."""
    from tf4ctr_dist.config import DataConfig, RunConfig

    raw = {
        "data": {"url": url, "shuffle_buffer_rows": shuffle_buffer_rows or DataConfig().shuffle_buffer_rows},
        "model": {**model_cfg(), **(model or {})},
        "loss": dict(LOSS),
        "train": {
            "batch_size": batch,
            "eval_batch_size": eval_batch or batch,
            "lr": LR,
            "embedding_lr": EMB_LR[optimizer],
            "emb_reg": emb_reg,
            "emb_reg_mode": emb_reg_mode(sharding, optimizer, device_type),
            "embedding_optimizer": optimizer,
            "sharding": sharding,
            "clip_grad_norm": CLIP,
            "seed": SEED,
            "cpu_kernels": cpu_kernels,
            "sync_batch_norm": sync_batch_norm,
        },
        "cluster": {"workers": workers, "use_gpu": device_type == "cuda"},
    }
    return RunConfig.from_dict(raw).to_dict()


def typed(model: dict, loss: dict) -> tuple[Any, Any]:
    """(ModelConfig, LossConfig) from their dicts, nested sections (model.encoders) included."""
    from tf4ctr_dist.config import RunConfig

    cfg = RunConfig.from_dict({"model": model, "loss": loss})
    return cfg.model, cfg.loss
