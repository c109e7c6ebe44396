"""Sharding plans, DMP wrapping and optimizers for the TF4CTR train module (inside workers).

The placement decision itself (which sharding types, kernel and optimizer) is made in
`placement.py`, without TorchRec, so the driver can check a run before any worker starts.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Iterable, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tf4ctr_dist.distributed.placement import (  # noqa: F401  (re-exported: callers plan and shard together)
    EmbeddingPlacement,
    ShardingError,
    resolve_placement,
)
from tf4ctr_dist.distributed.table_kernel import route_table_backward, uses_table_kernel  # noqa: F401
from tf4ctr_dist.kernels import CpuKernels
from tf4ctr_dist.modules.tf4ctr import TF4CTR

logger = logging.getLogger(__name__)


def fused_params(placement: EmbeddingPlacement, lr: float, weight_decay: float,
                 device_type: Optional[str] = None) -> dict:
    """fbgemm fused-optimizer settings; weight decay (L2 mode) touches only the looked-up rows.

    On the CPU (``device_type="cpu"``) fbgemm's separate id bounds check is off: its CPU lookup
    checks every id itself and raises on one out of range (naming the position, the id and the
    range), where the separate check in its default mode would log a warning and look up row 0
    instead; the check took 1-2% of a benchmark step. GPUs keep it (their lookup does not check)."""
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    kinds = {
        "adam": EmbOptimType.ADAM,
        "adagrad": EmbOptimType.EXACT_ADAGRAD,
        "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "sgd": EmbOptimType.EXACT_SGD,
    }
    params: dict = {"optimizer": kinds[placement.optimizer], "learning_rate": lr}
    if placement.optimizer == "adam":
        params.update(beta1=0.9, beta2=0.999, eps=1e-8)
    else:
        params["eps"] = 1e-8
    if weight_decay > 0:
        params.update(weight_decay=weight_decay, weight_decay_mode=WeightDecayMode.L2)
    if device_type == "cpu":
        params["bounds_check_mode"] = BoundsCheckMode.NONE
    return params


def table_constraints(
    tables: Iterable[EmbeddingBagConfig],
    placement: EmbeddingPlacement,
    pooling_factors: Optional[Mapping[str, float]] = None,
) -> dict[str, ParameterConstraints]:
    """Per-table planner constraints; ``pooling_factors`` (table name -> mean ids per sample,
    TorchRec assumes 1.0) only matter for sequence fields."""
    pooling_factors = pooling_factors or {}
    constraints = {}
    for t in tables:
        extra = {"pooling_factors": [float(pooling_factors[t.name])]} if t.name in pooling_factors else {}
        constraints[t.name] = ParameterConstraints(
            sharding_types=list(placement.sharding_types), compute_kernels=[placement.compute_kernel], **extra
        )
    return constraints


def make_sharders(placement: EmbeddingPlacement, embedding_lr: float, embedding_weight_decay: float,
                  device_type: Optional[str] = None) -> list:
    """The sharders DMP (and the planner) use: fused-optimizer settings only for fused tables."""
    params = fused_params(placement, embedding_lr, embedding_weight_decay, device_type) if placement.fused else None
    return [EmbeddingBagCollectionSharder(fused_params=params)]


def build_planner(
    tables: Iterable[EmbeddingBagConfig],
    placement: EmbeddingPlacement,
    topology: Topology,
    local_batch_size: int,
    pooling_factors: Optional[Mapping[str, float]] = None,
    **planner_kwargs,
) -> EmbeddingShardingPlanner:
    """The planner with the training constraints; ``planner_kwargs`` go to EmbeddingShardingPlanner
    (stats, proposer, storage_reservation, ...). Also used by ``plan_sim`` for offline plans."""
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=local_batch_size,
        constraints=table_constraints(tables, placement, pooling_factors),
        **planner_kwargs,
    )


def plan_sharding(
    module: nn.Module,
    tables: list[EmbeddingBagConfig],
    placement: EmbeddingPlacement,
    sharders: list,
    world_size: int,
    device_type: str,
    local_batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """Run the TorchRec planner (collectively when ``pg`` is given, so every rank agrees). Tables
    that fit no plan are a ShardingError (no restart can help), with the planner's own figures."""
    from torchrec.distributed.planner.types import PlannerError

    topology = training_topology(world_size, device_type)
    planner = build_planner(tables, placement, topology, local_batch_size)
    try:
        if pg is not None:
            return planner.collective_plan(module, sharders, pg)
        return planner.plan(module, sharders)
    except PlannerError as e:
        text = str(e)
        need, have = (re.search(rf"Global storage {what} for model parallel: Storage\(hbm = ([\d.]+) GB, "
                                r"ddr = ([\d.]+) GB\)", text) for what in ("requirement", "available"))
        figures = (f"the tables and their optimizer state need {need[1]} GB of GPU and {need[2]} GB of host memory "
                   f"in all, {have[1]} GB and {have[2]} GB are available" if need and have
                   else text.strip().splitlines()[0])
        device = topology.devices[0].storage
        raise ShardingError(
            f"the embedding tables fit no sharding plan on {world_size} worker(s) with {device.ddr / 2**30:.1f} GiB "
            f"of host memory each ({device.hbm / 2**30:.1f} GiB of GPU memory): {figures}. More workers, smaller "
            "vocabularies (min_count, hashed buckets) or table_precision=fp16 help; `tf4ctr plan --manifest DATA` "
            "shows what fits where"
        ) from None


def set_table_precision(module: nn.Module, data_type: DataType) -> None:
    """Store every table's weights as ``data_type`` (fp16: half the memory and lookup traffic;
    fbgemm keeps the optimizer state in fp32). Call before planning: the planner sizes shards
    from it and the sharded kernels take their weight precision from it."""
    for ebc in module.modules():
        if isinstance(ebc, EmbeddingBagCollection):
            for table in ebc.embedding_bag_configs():
                table.data_type = data_type


def training_topology(world_size: int, device_type: str) -> Topology:
    """The planner's view of this job: the real GPU memory (TorchRec assumes 32 GiB otherwise)
    and workers per node from LOCAL_WORLD_SIZE (set by Ray Train / torchrun), which decides
    which all-to-all traffic crosses nodes."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    kwargs: dict = {}
    if device_type == "cuda" and torch.cuda.is_available():
        kwargs["hbm_cap"] = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    memory = host_memory_bytes()
    if device_type == "cpu" and memory:  # TorchRec assumes 128 GiB per rank otherwise
        kwargs["ddr_cap"] = memory // max(1, local)
    return Topology(world_size=world_size, compute_device=device_type, local_world_size=local, **kwargs)


def host_memory_bytes() -> Optional[int]:
    """This machine's memory as the workers can use it: the physical memory, or the container's
    cgroup limit where that is lower; None where neither can be read."""
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 1 << 60:  # "max" or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else None


def shard_model(
    module: nn.Module,
    tables: list[EmbeddingBagConfig],
    placement: EmbeddingPlacement,
    *,
    device: torch.device,
    embedding_lr: float,
    embedding_weight_decay: float,
    local_batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
    table_precision: str = "fp32",
    concurrent_table_backward: Optional[bool] = None,
    table_kernel: Optional[CpuKernels] = None,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """Plan and wrap ``module`` (built on ``meta``) in DistributedModelParallel.

    table_kernel: the loaded CPU kernels (`tf4ctr_dist.kernels.load`), or None. Given, fused
    row-wise Adagrad tables on the CPU train with this package's backward + update kernel in
    place of fbgemm's; None, with fbgemm's. Either way the routing is set for the whole process
    (`table_kernel.route_table_backward`: the dispatcher has one kernel per op). fbgemm's CPU
    kernels drop weight decay: this logs a warning where that happens; training runs refuse
    such a config before they get here (`placement.check_table_weight_decay`).

    concurrent_table_backward: whether the TF4CTR models in ``module`` run their two table sets'
    backward passes on two threads (`backward_concurrently`). None: where it helps and is safe,
    i.e. one CPU worker with fused tables whose backward is fbgemm's single-threaded kernel (not
    the table kernel, which uses the intra-op threads itself) and at least two intra-op threads
    (with several ranks each table set's backward would run an all-to-all, and two threads could
    order those differently on different ranks).
    """
    pg = pg or dist.group.WORLD
    world_size = dist.get_world_size(pg)
    routed = uses_table_kernel(placement, device, table_kernel)
    route_table_backward(table_kernel if routed else None, routed)
    if not routed and device.type == "cpu" and placement.fused and embedding_weight_decay > 0:
        # fbgemm 1.8's CPU kernels (row-wise Adagrad, Adagrad, SGD) leave weight decay out of the update
        why = ("tf4ctr_dist's table kernel was not given (cpu_kernels=off, or not built)"
               if placement.optimizer == "rowwise_adagrad" else "use embedding_optimizer=rowwise_adagrad for it")
        logger.warning(
            "embedding weight decay %g will not be applied: fbgemm's CPU %s kernel ignores it; %s",
            embedding_weight_decay, placement.optimizer, why,
        )
    if concurrent_table_backward is None:
        concurrent_table_backward = (
            world_size == 1 and device.type == "cpu" and placement.fused and torch.get_num_threads() > 1
            and not routed
        )
    for m in module.modules():
        if isinstance(m, TF4CTR):
            m.concurrent_table_backward = concurrent_table_backward
    if table_precision == "fp16":
        set_table_precision(module, DataType.FP16)
    sharders = make_sharders(placement, embedding_lr, embedding_weight_decay, device.type)
    plan = plan_sharding(module, tables, placement, sharders, world_size, device.type, local_batch_size, pg)
    dmp = DistributedModelParallel(
        module=module,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    return dmp, plan


def is_embedding_param(name: str) -> bool:
    return "embedding_bags" in name


@torch.no_grad()
def clip_gradients(params: list, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm), without its multiply by 1.0 when the
    norm is within bounds and every gradient is on the CPU (where reading the norm costs no
    device sync): x * 1.0 == x, so the result is identical. Returns the total norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads)
    on_cpu = all(g.device.type == "cpu" for g in grads)
    if on_cpu and float(max_norm / (total + 1e-6)) >= 1.0:  # torch's clip coefficient; NaN compares False
        return total
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class DenseStepHooks(OptimizerWrapper):
    """Before every optimizer step, in the authors' order: add the embedding penalty's gradient,
    then clip the gradient norm, then step.

    Penalty on data-parallel tables (fused tables get theirs from fbgemm, see ``fused_params``):
      full:    lambda*E on every row, the gradient of (lambda/2)*||E||^2 over whole tables;
      touched: lambda*E_r on the rows with a non-zero gradient this step, the gradient of
               (lambda/2)*sum over looked-up rows of ||E_r||^2 (the form that scales).
    Clipping covers the dense parameters and, with ``clip_embeddings``, the data-parallel
    tables too: FuxiCTR clips the norm over every parameter, and because BatchNorm amplifies
    the gradient of the 1e-4-scale initial embeddings, that clip is active early in training.
    """

    def __init__(self, optimizer, dense_params: list, emb_params: list, clip: float, clip_embeddings: bool,
                 full_decay: float, touched_decay: float):
        super().__init__(optimizer)
        self._clip_params = dense_params + (emb_params if clip_embeddings else [])
        self._emb_params = emb_params
        self._clip = clip
        self._full_decay = full_decay
        self._touched_decay = touched_decay

    @torch.no_grad()
    def _add_penalty_gradient(self) -> None:
        for p in self._emb_params:
            if p.grad is None:
                continue
            if self._full_decay > 0:
                p.grad.add_(p, alpha=self._full_decay)
            if self._touched_decay > 0:
                touched = p.grad.abs().sum(dim=1) != 0  # (rows,)
                p.grad[touched] += self._touched_decay * p[touched]

    def step(self, closure=None):  # type: ignore[override]
        self._add_penalty_gradient()
        if self._clip > 0 and self._clip_params:
            clip_gradients(self._clip_params, self._clip)
        return super().step(closure)


def build_optimizer(
    dmp: DistributedModelParallel,
    *,
    lr: float,
    embedding_lr: float,
    emb_reg: float,
    emb_reg_mode: str,
    clip_grad_norm: float,
    clip_embeddings: bool = True,
    fused_adam: bool = True,
) -> KeyedOptimizer:
    """Adam over every parameter not updated by a fused kernel, combined with the fused one.

    Data-parallel (dense-kernel) tables are Adam's second group (lr ``embedding_lr``); their
    penalty and clipping are applied by ``DenseStepHooks`` before each step. ``fused_adam``:
    torch's one-kernel Adam (CPU and CUDA; 0.8 ms instead of 3.1 ms per step for the 0.86M dense
    parameters of the benchmark model on 2 cores, results equal to the loop to 1 ulp); False: the
    per-parameter loop.
    """
    named = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    emb = {k: v for k, v in named.items() if is_embedding_param(k)}
    dense = {k: v for k, v in named.items() if not is_embedding_param(k)}
    emb_ids = {id(p) for p in emb.values()}

    def make(params: list) -> torch.optim.Optimizer:
        # KeyedOptimizerWrapper hands over one flat list; split it back by identity.
        groups = [
            {"params": [p for p in params if id(p) not in emb_ids], "lr": lr},
            {"params": [p for p in params if id(p) in emb_ids], "lr": embedding_lr},
        ]
        return torch.optim.Adam([g for g in groups if g["params"]], lr=lr, fused=fused_adam or None)

    optimizers: list = [("dense", KeyedOptimizerWrapper({**dense, **emb}, make))]
    fused = dmp.fused_optimizer
    if fused.params:
        optimizers.insert(0, ("sparse", fused))
    return DenseStepHooks(
        CombinedOptimizer(optimizers),
        list(dense.values()),
        list(emb.values()),
        clip=clip_grad_norm,
        clip_embeddings=clip_embeddings,
        full_decay=emb_reg if emb_reg_mode == "full" else 0.0,
        touched_decay=emb_reg if emb_reg_mode == "touched" else 0.0,
    )


def leaf_optimizers(optimizer) -> list:
    """The optimizers that really own param groups, below TorchRec's combining wrappers (whose
    param_groups are fresh lists, so writing to them would not reach fused tables)."""
    if hasattr(optimizer, "optimizers"):  # CombinedOptimizer
        return [leaf for _, sub in optimizer.optimizers for leaf in leaf_optimizers(sub)]
    inner = getattr(optimizer, "_optimizer", None)  # OptimizerWrapper / KeyedOptimizerWrapper
    if inner is not None:
        return leaf_optimizers(inner)
    return [optimizer]


def scale_lr(optimizer: KeyedOptimizer, factor: float, min_lr: float) -> float:
    """Multiply every group's lr (dense and fused) by ``factor``, floored at ``min_lr``; returns
    the largest new lr."""
    new = min_lr
    for leaf in leaf_optimizers(optimizer):
        for group in leaf.param_groups:
            group["lr"] = max(group["lr"] * factor, min_lr)
            new = max(new, group["lr"])
    return new


def summarize_plan(plan: ShardingPlan, world_size: int) -> str:
    """Two console lines for a plan: tables per sharding type and per rank (plan.txt has each table)."""
    by_type: dict[str, int] = {}
    per_rank = [0] * world_size
    for module_plan in plan.plan.values():
        for ps in module_plan.values():  # type: ignore[union-attr]
            by_type[ps.sharding_type] = by_type.get(ps.sharding_type, 0) + 1
            if ps.sharding_type != ShardingType.DATA_PARALLEL.value:
                for r in set(ps.ranks or []):
                    per_rank[r] += 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(by_type.items()))
    ranks = ", ".join(f"rank{r}: {n}" for r, n in enumerate(per_rank))
    return f"{sum(by_type.values())} tables: {kinds}" + (f" (sharded tables per rank: {ranks})" if any(per_rank) else "")


def describe_plan(plan: ShardingPlan, tables: list[EmbeddingBagConfig], world_size: int) -> str:
    """Human-readable plan: where each table lives and the table bytes per rank (fp32 weights)."""
    sizes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    per_rank = [0] * world_size
    lines = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            rows, dim = sizes.get(table, (0, 0))
            ranks = ps.ranks or list(range(world_size))
            if ps.sharding_type == ShardingType.DATA_PARALLEL.value:
                for r in range(world_size):
                    per_rank[r] += rows * dim * 4
            elif ps.sharding_spec is not None:
                for shard in ps.sharding_spec.shards:  # type: ignore[union-attr]
                    r = shard.placement.rank()
                    per_rank[r] += shard.shard_sizes[0] * shard.shard_sizes[1] * 4
            lines.append(
                f"  {module_path}.{table:<24} {rows:>10,} x {dim:<3} {ps.sharding_type:<14} "
                f"{ps.compute_kernel:<6} ranks={ranks}"
            )
    mem = ", ".join(f"rank{r}={b / 2**20:.1f} MiB" for r, b in enumerate(per_rank))
    return "sharding plan:\n" + "\n".join(lines) + f"\n  table weights per rank: {mem}"
