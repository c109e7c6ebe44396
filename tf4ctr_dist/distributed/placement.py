"""Where the tables go and which optimizer trains them: decisions only, no TorchRec import.

The driver checks a run's settings with these before any worker starts (it never imports
torchrec); `sharding.py` turns the decision into TorchRec constraints and sharders inside the
workers. The names below are TorchRec's ShardingType / EmbeddingComputeKernel values.

The choice that matters most on CPU: fbgemm's fused CPU kernels implement SGD and (row-wise)
Adagrad only. The paper's Adam on embeddings therefore needs ``data_parallel`` sharding with the
``dense`` kernel on CPU (tables replicated, gradients all-reduced, Adam from the dense
optimizer); sharded (table/column-wise) tables train with a fused sparse optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tf4ctr_dist.config import ConfigError, RunConfig

DATA_PARALLEL, TABLE_WISE, COLUMN_WISE, ROW_WISE, TABLE_ROW_WISE = (
    "data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise")
FUSED_KERNEL, DENSE_KERNEL = "fused", "dense"


class ShardingError(ValueError):
    """The requested sharding / optimizer combination cannot run on this device type."""


@dataclass(frozen=True)
class EmbeddingPlacement:
    """Resolved sharding types, compute kernel and optimizer for every table."""

    sharding_types: tuple[str, ...]
    compute_kernel: str
    optimizer: str  # "adam" | "adagrad" | "rowwise_adagrad" | "sgd"
    fused: bool  # True: fbgemm fused optimizer updates tables in backward

    def describe(self) -> str:
        how = "fused in backward" if self.fused else "dense optimizer, gradients all-reduced"
        return (
            f"sharding={'/'.join(self.sharding_types)} kernel={self.compute_kernel} "
            f"embedding optimizer={self.optimizer} ({how})"
        )


def resolve_placement(sharding: str, optimizer: str, device_type: str) -> EmbeddingPlacement:
    """Pick sharding types and kernel for ``sharding`` ("auto" or a type) on ``device_type``.

    Raises ShardingError for combinations TorchRec / fbgemm cannot run (row-wise over gloo,
    fused Adam on CPU) with the alternative spelled out.
    """
    cpu = device_type == "cpu"
    if sharding == ROW_WISE and cpu:
        raise ShardingError(
            "row_wise sharding needs GPUs (TorchRec does not support it over gloo); "
            "use sharding=table_wise or column_wise on CPU"
        )
    if sharding == "auto":
        if cpu and optimizer == "adam":
            sharding = DATA_PARALLEL
        elif cpu:
            return EmbeddingPlacement((TABLE_WISE, COLUMN_WISE), FUSED_KERNEL, optimizer, True)
        else:
            return EmbeddingPlacement((TABLE_WISE, COLUMN_WISE, ROW_WISE, TABLE_ROW_WISE), FUSED_KERNEL, optimizer, True)
    if sharding == DATA_PARALLEL:
        return EmbeddingPlacement((DATA_PARALLEL,), DENSE_KERNEL, optimizer, False)
    if cpu and optimizer == "adam":
        raise ShardingError(
            f"sharding={sharding} with embedding_optimizer=adam is not possible on CPU: fbgemm's fused "
            "CPU kernels support only sgd, adagrad and rowwise_adagrad. Use sharding=data_parallel "
            "(Adam on replicated tables) or embedding_optimizer=rowwise_adagrad"
        )
    return EmbeddingPlacement((sharding,), FUSED_KERNEL, optimizer, True)


def check_run_config(cfg: RunConfig, device_type: str, world_size: int) -> EmbeddingPlacement:
    """Refuse settings that cannot run on ``world_size`` workers of ``device_type``; returns
    the table placement. Runs on the driver before Ray starts, and again in every worker."""
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
    if cfg.train.table_precision != "fp32" and not placement.fused:
        raise ConfigError(
            f"table_precision={cfg.train.table_precision} applies to fused (sharded) tables; with "
            f"sharding={cfg.train.sharding} the tables are dense torch parameters. Use table_precision=fp32"
        )
    dims = {cfg.model.embedding_dim} | ({cfg.model.embedding_dim // 2} if cfg.model.ssem == "ser" else set())
    if placement.fused and any(d % 4 for d in dims):
        raise ConfigError(
            f"embedding_dim={cfg.model.embedding_dim}: fbgemm's fused tables need every table dim to be a multiple "
            f"of 4 (with ssem=ser the easy tables have dim d/2), so use a multiple of 8, or sharding=data_parallel"
        )
    # On the driver "auto" may still build: the worker checks again with what it loaded.
    check_table_weight_decay(cfg, placement, device_type, table_kernel=cfg.train.cpu_kernels != "off")
    return placement


def check_table_weight_decay(cfg: RunConfig, placement: EmbeddingPlacement, device_type: str,
                             table_kernel: bool) -> None:
    """Refuse embedding weight decay on fused CPU tables that fbgemm's kernel would train.

    fbgemm's CPU backward kernels (row-wise Adagrad, Adagrad, SGD) leave weight decay out of the
    update; this package's row-wise Adagrad kernel applies it. Without this check the same config
    would train different maths on a machine that can build the kernels and one that cannot.
    ``table_kernel``: whether this package's kernel will train the tables (loaded and not off)."""
    if device_type != "cpu" or not placement.fused or cfg.train.emb_reg <= 0:
        return
    if placement.optimizer in ("adagrad", "sgd"):
        raise ConfigError(
            f"emb_reg={cfg.train.emb_reg:g} with embedding_optimizer={placement.optimizer} on fused CPU tables: "
            f"fbgemm's CPU {placement.optimizer} kernel ignores weight decay, so the penalty would silently not "
            "be applied. Use embedding_optimizer=rowwise_adagrad (this package's kernel applies it), "
            "sharding=data_parallel, or emb_reg=0"
        )
    if placement.optimizer == "rowwise_adagrad" and not table_kernel:
        why = ("cpu_kernels=off" if cfg.train.cpu_kernels == "off"
               else "the CPU kernels could not be built on this machine (see the warning above)")
        raise ConfigError(
            f"emb_reg={cfg.train.emb_reg:g} on fused CPU row-wise Adagrad tables needs this package's table "
            f"kernel, but {why}: fbgemm's CPU kernel would silently drop the weight decay, and the run would "
            "train different maths than where the kernel runs. Use cpu_kernels=on (or auto with a C++ compiler "
            "and ninja), sharding=data_parallel, or emb_reg=0"
        )
