"""Offline sharding plans: what TorchRec's planner does with the TF4CTR tables on a cluster you
do not have (``tf4ctr plan --help``).

The model is built on device ``meta`` (no table is materialised, so a 1e9-row plan needs no
memory) and handed to the same planner training uses (``sharding.build_planner``: the same
``resolve_placement`` sharding types and kernel, the same sharders / fused-optimizer settings),
with a Topology describing the target cluster instead of the training default. No process group
is needed: ``planner.plan`` runs in this process.

Memory per rank comes from two places:
  * the planner's own storage estimate for every shard it placed (weights, optimizer state and
    its input/output buffer heuristic), summed per rank (HBM and DDR);
  * the table state computed from the shard sizes: rows x cols x 4 bytes of fp32 weights plus
    optimizer state: Adam 2 fp32 states per element (8 B), Adagrad 1 per element (4 B),
    row-wise Adagrad 1 fp32 per row of every shard (4 B), SGD none.
So that the planner counts optimizer state at all, the meta embedding weights are tagged with the
optimizer class (the attribute TorchRec's storage estimator reads); training's planner does not
see this tag (see ``_tag_optimizer_state``).

All-to-all estimate (see ``A2A_FORMULA``): bytes on the network per training sample, expected
over which rank the sample is on, split into intra-node and inter-node traffic.

Search: ``full`` is exactly the training search (TorchRec's default proposers over every
sharding type training allows). A plain row_wise option has one shard per rank, and on a large
multi-node cluster enumerating and partitioning those dominates (minutes on a CPU for 1024
ranks), so ``fast`` (default) leaves row_wise out when the cluster has several nodes and every
table fits inside one node: table_row_wise then covers the same memory need with node-local
reduce-scatters instead of a reduce-scatter over all ranks. Same proposers, same everything else;
for the 1e9-row twin-table case on 64 and 1024 H100s it gives the same plan as ``full``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import PlannerError, ShardingOption, Stats
from torchrec.distributed.types import ShardingType

from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.distributed.sharding import (
    EmbeddingPlacement,
    build_planner,
    is_embedding_param,
    make_sharders,
    resolve_placement,
    table_constraints,
)
from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr

from tf4ctr_dist.planning.cluster import (  # noqa: F401  (re-exported: the planning API in one place)
    EMB_BYTES, GB, ID_BYTES, RESERVED_FRACTION, WEIGHT_BYTES, ClusterSpec, DEVICE_TYPES, DeviceType, FieldInput,
    GiB, KiB, MiB, criteo_like_fields, fields_from_manifest, fields_from_spec, fields_from_vocab_sizes,
    _check_fields, _reservation_words,
)
from tf4ctr_dist.planning.report import A2A_FORMULA, format_ranks, format_report  # noqa: F401




class PlanFitError(ValueError):
    """The tables cannot be placed on the described cluster (the message says how much is missing)."""




# ---- optimizer state --------------------------------------------------------------------------


def optimizer_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """Optimizer state of a rows x cols (shard of a) table: Adam 2 fp32 per element, Adagrad 1
    per element, row-wise Adagrad 1 fp32 per row, SGD none."""
    if optimizer == "adam":
        return 8 * rows * cols
    if optimizer == "adagrad":
        return 4 * rows * cols
    if optimizer == "rowwise_adagrad":
        return 4 * rows
    if optimizer == "sgd":
        return 0
    raise ValueError(f"unknown embedding optimizer {optimizer!r}")


def table_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    return WEIGHT_BYTES * rows * cols + optimizer_state_bytes(optimizer, rows, cols)


def _tag_optimizer_state(module: torch.nn.Module, optimizer: str) -> None:
    """Tag the meta embedding weights with the optimizer class TorchRec's storage estimator reads
    (``_optimizer_classes``; Adam -> 2x, Adagrad -> 1x, RowWiseAdagrad -> 1/dim, SGD -> 0).

    Only for planning: the sharder also reads this tag and would derive fused-optimizer settings
    from it, so training (which passes them as ``fused_params``) does not set it, and its planner
    therefore leaves optimizer state out of its memory estimate."""
    from torchrec.optim import RowWiseAdagrad

    cls = {
        "adam": torch.optim.Adam,
        "adagrad": torch.optim.Adagrad,
        "rowwise_adagrad": RowWiseAdagrad,
        "sgd": torch.optim.SGD,
    }[optimizer]
    for name, param in module.named_parameters():
        if is_embedding_param(name):
            param._optimizer_classes = [cls]  # type: ignore[attr-defined]


# ---- the report -------------------------------------------------------------------------------


@dataclass
class TablePlan:
    name: str
    feature: str
    rows: int
    dim: int
    pooling_factor: float
    sharding_type: str
    compute_kernel: str
    shards: list[tuple[int, int, int]]  # (rows, cols, rank)
    state_bytes: int  # weights + optimizer state, all shards
    planner_hbm: int
    planner_ddr: int

    @property
    def ranks(self) -> list[int]:
        return sorted({r for _, _, r in self.shards})


@dataclass
class RankMemory:
    rank: int
    planner_hbm: int  # TorchRec's estimate for the shards on this rank
    planner_ddr: int
    table_state: int  # weights + optimizer state of the shards on this rank
    capacity: int  # HBM (GPU) or DDR (CPU) per rank
    usable: int  # capacity left for tables after TorchRec's reservation


@dataclass
class A2AEstimate:
    per_sample: dict[str, dict[str, float]]  # {"ids"|"fwd"|"bwd"|"total": {"intra", "inter", "all"}}
    per_sample_max_rank: float  # largest per-sample total over the rank a sample is on
    local_batch: int
    per_step_per_rank: float  # bytes
    time_per_step_s: float  # lower bound from bandwidths
    dense_allreduce_bytes_per_step: float  # per rank, ring all-reduce of dense (+ DP table) grads
    dense_params: int


@dataclass
class PlanReport:
    fields: list[FieldInput]
    cluster: ClusterSpec
    model: dict[str, Any]
    optimizer: str
    placement: str
    sharding_types_searched: list[str]
    search: str
    search_note: str
    global_batch: int
    local_batch: int
    tables: list[TablePlan]
    ranks: list[RankMemory]
    a2a: A2AEstimate
    num_proposals: int
    plan_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        state = sum(t.state_bytes for t in self.tables)
        weights = sum(WEIGHT_BYTES * t.rows * t.dim for t in self.tables)
        return {
            "fields": [dataclasses.asdict(f) for f in self.fields],
            "cluster": {
                "device_type": self.cluster.device.name,
                "compute_device": self.cluster.device.compute_device,
                "world_size": self.cluster.world_size,
                "ranks_per_node": self.cluster.ranks_per_node,
                "nodes": self.cluster.nodes,
                "hbm_per_rank_bytes": self.cluster.hbm_per_rank,
                "ddr_per_rank_bytes": self.cluster.ddr_per_rank,
                "intra_node_bw_bytes_per_s": self.cluster.intra_node_bw,
                "inter_node_bw_bytes_per_s": self.cluster.inter_node_bw,
            },
            "model": self.model,
            "embedding_optimizer": self.optimizer,
            "placement": self.placement,
            "sharding_types_searched": self.sharding_types_searched,
            "search": self.search,
            "search_note": self.search_note,
            "global_batch": self.global_batch,
            "local_batch": self.local_batch,
            "num_proposals": self.num_proposals,
            "plan_seconds": round(self.plan_seconds, 3),
            "totals": {
                "tables": len(self.tables),
                "rows": sum(t.rows for t in self.tables),
                "parameters": sum(t.rows * t.dim for t in self.tables),
                "weight_bytes": weights,
                "optimizer_state_bytes": state - weights,
                "table_state_bytes": state,
            },
            "tables": [
                {
                    "name": t.name, "feature": t.feature, "rows": t.rows, "dim": t.dim,
                    "pooling_factor": t.pooling_factor, "sharding_type": t.sharding_type,
                    "compute_kernel": t.compute_kernel, "ranks": t.ranks,
                    "shards": [{"rows": r, "cols": c, "rank": k} for r, c, k in t.shards],
                    "state_bytes": t.state_bytes, "planner_hbm_bytes": t.planner_hbm,
                    "planner_ddr_bytes": t.planner_ddr,
                }
                for t in self.tables
            ],
            "memory_per_rank": [dataclasses.asdict(r) for r in self.ranks],
            "a2a": dataclasses.asdict(self.a2a),
            "a2a_formula": A2A_FORMULA,
            "notes": self.notes,
        }


class _CaptureStats(Stats):
    """Keeps the planner's chosen ShardingOptions (with per-shard storage) instead of printing."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.num_proposals = 0

    def log(self, sharding_plan, topology, batch_size, storage_reservation, num_proposals, num_plans,  # type: ignore[override]
            run_time, best_plan, constraints=None, sharders=None, enumerator=None, debug=False, **kwargs) -> None:
        self.best_plan = list(best_plan)
        self.num_proposals = num_proposals


# ---- planning ---------------------------------------------------------------------------------


def simulate_plan(
    fields: Sequence[FieldInput],
    cfg: RunConfig,
    cluster: ClusterSpec,
    *,
    batch_size: Optional[int] = None,
    search: str = "fast",
) -> PlanReport:
    """Plan the TF4CTR tables of ``cfg.model`` for ``fields`` on ``cluster`` (see module doc).

    Raises PlanFitError when the tables do not fit, ShardingError for placements training would
    refuse, ValueError for a batch that does not divide over the ranks."""
    if search not in ("full", "fast"):
        raise ValueError(f"search must be full or fast, got {search!r}")
    _check_fields(fields)
    W = cluster.world_size
    global_batch = batch_size or cfg.train.batch_size
    if global_batch % W:
        raise ValueError(f"batch_size={global_batch} (global) must divide evenly across {W} ranks (as in training)")
    local_batch = global_batch // W
    notes: list[str] = []

    pairs = [(f.name, f.vocab_size) for f in fields]
    numeric = {f.name for f in fields if f.numeric}
    tables = embedding_tables(pairs, cfg.model, numeric=numeric)
    pf_by_feature = {f.name: f.pooling_factor for f in fields}
    pooling = {t.name: pf_by_feature[t.feature_names[0]] for t in tables if pf_by_feature[t.feature_names[0]] != 1.0}
    optimizer = cfg.train.embedding_optimizer
    placement = resolve_placement(cfg.train.sharding, optimizer, cluster.device.compute_device)
    if placement.fused and cfg.train.emb_reg > 0 and cfg.train.emb_reg_mode == "full":
        notes.append("training would refuse emb_reg_mode=full with fused (sharded) tables; use emb_reg_mode=touched")
    emb_lr = cfg.train.embedding_lr or cfg.train.lr
    sharders = make_sharders(placement, emb_lr, cfg.train.emb_reg if placement.fused else 0.0)

    module = TF4CTRTrain(tf4ctr(pairs, cfg.model, device="meta", numeric=numeric), Objective(cfg.loss))
    _tag_optimizer_state(module, optimizer)
    dense_params = sum(p.numel() for n, p in module.named_parameters() if not is_embedding_param(n))

    topology = cluster.topology()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "HeuristicalStorageReservation is known to ..."
        reservation = HeuristicalStorageReservation(percentage=RESERVED_FRACTION)  # the planner's default
    reserved = reservation.reserve(
        topology=topology, batch_size=local_batch, module=module, sharders=sharders,
        constraints=table_constraints(tables, placement, pooling),
    )
    capacity = cluster.hbm_per_rank if cluster.on_gpu else cluster.ddr_per_rank
    usable = max(0, reserved.devices[0].storage.hbm if cluster.on_gpu else reserved.devices[0].storage.ddr)
    state = {t.name: table_state_bytes(optimizer, t.num_embeddings, t.embedding_dim) for t in tables}
    _check_fit(state, placement, cluster, capacity, usable, optimizer)

    searched = placement
    search_note = "TorchRec's default proposers over every sharding type training allows"
    if search == "fast":
        types = placement.sharding_types
        rw, twrw = ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value
        node_usable = usable * cluster.ranks_per_node
        if W > cluster.ranks_per_node and rw in types and twrw in types and max(state.values()) <= node_usable:
            searched = dataclasses.replace(placement, sharding_types=tuple(t for t in types if t != rw))
            search_note = (
                f"TorchRec's default proposers; row_wise left out: every table fits in one node's "
                f"{node_usable / GiB:,.1f} GiB, where table_row_wise reduces node-locally; "
                "--search full runs training's exact search"
            )

    stats = _CaptureStats()
    planner = build_planner(
        tables, searched, topology, local_batch, pooling,
        stats=[stats], storage_reservation=reservation,
    )
    start = time.perf_counter()
    try:
        planner.plan(module, sharders)
    except PlannerError as exc:
        raise PlanFitError(_fit_message(state, placement, cluster, capacity, usable, optimizer, str(exc))) from None
    seconds = time.perf_counter() - start

    table_by_name = {t.name: t for t in tables}
    placed: list[TablePlan] = []
    for so in stats.best_plan:
        t = table_by_name[so.name]
        shards = [(int(s.size[0]), int(s.size[1]), int(s.rank)) for s in so.shards]  # type: ignore[arg-type]
        if so.sharding_type == ShardingType.DATA_PARALLEL.value:
            shards = [(t.num_embeddings, t.embedding_dim, r) for r in range(W)]
        placed.append(TablePlan(
            name=so.name, feature=t.feature_names[0], rows=t.num_embeddings, dim=t.embedding_dim,
            pooling_factor=pf_by_feature[t.feature_names[0]], sharding_type=so.sharding_type,
            compute_kernel=so.compute_kernel, shards=shards,
            state_bytes=sum(table_state_bytes(optimizer, r, c) for r, c, _ in shards),
            planner_hbm=sum(s.storage.hbm for s in so.shards if s.storage),
            planner_ddr=sum(s.storage.ddr for s in so.shards if s.storage),
        ))
    order = {t.name: i for i, t in enumerate(tables)}
    placed.sort(key=lambda p: order[p.name])

    ranks = [RankMemory(r, 0, 0, 0, capacity, usable) for r in range(W)]
    for so in stats.best_plan:
        dp = so.sharding_type == ShardingType.DATA_PARALLEL.value
        for s in so.shards:
            if s.storage is None:
                continue
            for r in (range(W) if dp and len(so.shards) == 1 else [s.rank]):
                ranks[r].planner_hbm += s.storage.hbm
                ranks[r].planner_ddr += s.storage.ddr
    for p in placed:
        for rows, cols, r in p.shards:
            ranks[r].table_state += table_state_bytes(optimizer, rows, cols)

    dp_bytes = sum(WEIGHT_BYTES * p.rows * p.dim for p in placed if p.sharding_type == ShardingType.DATA_PARALLEL.value)
    a2a = estimate_a2a(placed, cluster, local_batch, dense_params * WEIGHT_BYTES + dp_bytes, dense_params)
    if any(f.pooling_factor != 1.0 for f in fields):
        notes.append("sequence fields count pooling_factor ids per sample (max_len from a manifest: an upper bound)")
    if cluster.on_gpu and any(p.planner_ddr for p in placed):
        notes.append("some tables were placed in host memory (UVM) by the planner")
    return PlanReport(
        fields=list(fields),
        cluster=cluster,
        model={
            "ssem": cfg.model.ssem, "embedding_dim": cfg.model.embedding_dim,
            "twin_tables": cfg.model.ssem == "ser",
        },
        optimizer=optimizer,
        placement=placement.describe(),
        sharding_types_searched=list(searched.sharding_types),
        search=search,
        search_note=search_note,
        global_batch=global_batch,
        local_batch=local_batch,
        tables=placed,
        ranks=ranks,
        a2a=a2a,
        num_proposals=stats.num_proposals,
        plan_seconds=seconds,
        notes=notes,
    )


def _check_fit(
    state: dict[str, int], placement: EmbeddingPlacement, cluster: ClusterSpec, capacity: int, usable: int,
    optimizer: str,
) -> None:
    """Fail before searching when the tables cannot fit whatever the planner does."""
    total = sum(state.values())
    replicated = placement.sharding_types == (ShardingType.DATA_PARALLEL.value,)
    have = usable if replicated else usable * cluster.world_size  # data_parallel: every rank holds all
    if total > have:
        raise PlanFitError(_fit_message(state, placement, cluster, capacity, usable, optimizer, None))


def _fit_message(
    state: dict[str, int], placement: EmbeddingPlacement, cluster: ClusterSpec, capacity: int, usable: int,
    optimizer: str, planner_error: Optional[str],
) -> str:
    total = sum(state.values())
    kind = "HBM" if cluster.on_gpu else "host memory"
    W = cluster.world_size
    largest = max(state, key=state.__getitem__)
    replicated = placement.sharding_types == (ShardingType.DATA_PARALLEL.value,)
    lines = [
        f"the embedding tables do not fit on {W} x {cluster.device.name}:",
        f"  needed: {total / GiB:,.1f} GiB of table state (fp32 weights + {optimizer} state) "
        + ("on EVERY rank (data_parallel replicates the tables)" if replicated else "in all"),
        f"  available: {usable / GiB:,.1f} GiB {kind} per rank for tables ({capacity / GiB:,.1f} GiB minus "
        f"{(capacity - usable) / GiB:,.1f} GiB {_reservation_words(cluster)})"
        + ("" if replicated else f" = {usable * W / GiB:,.1f} GiB over {W} ranks"),
        f"  largest table: {largest} {state[largest] / GiB:,.1f} GiB; sharding types allowed: "
        f"{', '.join(placement.sharding_types)}",
    ]
    if replicated:
        lines.append("  use sharding=auto / table_wise / row_wise on GPUs, or embedding_optimizer=rowwise_adagrad")
    elif total > usable * W and usable > 0:
        node = cluster.node_size
        min_ranks = math.ceil(math.ceil(total / usable) / node) * node
        lines.append(f"  at least {min_ranks} ranks of this type are needed (whole nodes of {node}; "
                     "more for balance), or a device with more memory")
    elif total <= usable * W:
        lines.append("  the total would fit: the allowed sharding types cannot split the large tables finely "
                     "enough (allow row_wise / table_row_wise: sharding=auto)")
    if planner_error:
        first = planner_error.strip().splitlines()[0] if planner_error.strip() else ""
        lines.append(f"  (TorchRec planner: {first})")
    return "\n".join(lines)


# ---- all-to-all estimate ----------------------------------------------------------------------


def estimate_a2a(
    tables: Sequence[TablePlan], cluster: ClusterSpec, local_batch: int, allreduce_bytes: float = 0.0,
    dense_params: int = 0,
) -> A2AEstimate:
    """Network bytes per training sample (the model printed as ``A2A_FORMULA``).

    A sample on rank q needs, from every shard s of every table t (s on rank r_s, holding
    rows_s of the table's rows_t rows and cols_s of its d_t columns; L_t ids per sample):
      ids   L_t * 8 * rows_s / rows_t   int64 ids q -> r_s (a column/table shard sees every id,
                                       a row shard its share; lengths/offsets are not counted)
      fwd   cols_s * 4                  fp32 pooled output r_s -> q (a row shard returns a partial
                                       sum of all d_t columns, so row_wise costs (W-1) * d_t * 4)
      bwd   cols_s * 4                  the output gradient q -> r_s
    Nothing moves when r_s == q; it is intra-node traffic when r_s is on q's node, inter-node
    otherwise. table_row_wise reduces inside the owning node first (the n shards' partials go
    to the node's rank with q's local index: intra-node), then one d_t * 4 transfer reaches q
    (inter-node unless q is on that node); backward mirrors it. With every table table-wise this
    is sum_t (W-1)/W * (L_t * 8 + 2 * d_t * 4) per sample.

    Computed for every q exactly, then averaged over q (samples are spread evenly over ranks);
    per rank per step = local batch x that mean. ``allreduce_bytes``: gradient bytes all-reduced
    every step (dense model + data_parallel tables), reported as a ring all-reduce
    2 * (W-1)/W * bytes per rank."""
    W, n = cluster.world_size, cluster.ranks_per_node
    node = [r // n for r in range(W)]
    kinds = ("ids", "fwd", "bwd")
    # bytes caused by one sample on rank q, per kind and link: [kind][link][q]
    per_q = {k: {"intra": [0.0] * W, "inter": [0.0] * W} for k in kinds}

    # Direct shards (TW, CW, RW): cost b to/from r_s, paid when q != r_s. Aggregate per rank first.
    direct = {k: [0.0] * W for k in kinds}
    for t in tables:
        if t.sharding_type == ShardingType.DATA_PARALLEL.value:
            continue
        twrw = t.sharding_type == ShardingType.TABLE_ROW_WISE.value
        for rows, cols, r in t.shards:
            direct["ids"][r] += t.pooling_factor * ID_BYTES * rows / t.rows
            if not twrw:
                direct["fwd"][r] += cols * EMB_BYTES
                direct["bwd"][r] += cols * EMB_BYTES
        if twrw:  # reduce inside the owning node, then one d*4 transfer to q
            owner_node = node[t.shards[0][2]]
            by_rank = {}
            for rows, cols, r in t.shards:
                by_rank[r] = by_rank.get(r, 0.0) + cols * EMB_BYTES
            node_total = sum(by_rank.values())
            for q in range(W):
                aggregator = owner_node * n + q % n
                intra = node_total - by_rank.get(aggregator, 0.0)
                inter = 0.0 if node[q] == owner_node else t.dim * EMB_BYTES
                for k in ("fwd", "bwd"):
                    per_q[k]["intra"][q] += intra
                    per_q[k]["inter"][q] += inter
    for k in kinds:
        node_sum = [0.0] * cluster.nodes
        for r in range(W):
            node_sum[node[r]] += direct[k][r]
        total = sum(node_sum)
        for q in range(W):
            per_q[k]["intra"][q] += node_sum[node[q]] - direct[k][q]
            per_q[k]["inter"][q] += total - node_sum[node[q]]

    per_sample: dict[str, dict[str, float]] = {}
    for k in kinds:
        intra = sum(per_q[k]["intra"]) / W
        inter = sum(per_q[k]["inter"]) / W
        per_sample[k] = {"intra": intra, "inter": inter, "all": intra + inter}
    per_sample["total"] = {
        link: sum(per_sample[k][link] for k in kinds) for link in ("intra", "inter", "all")
    }
    worst = max(sum(per_q[k][link][q] for k in kinds for link in ("intra", "inter")) for q in range(W))
    step_intra = per_sample["total"]["intra"] * local_batch
    step_inter = per_sample["total"]["inter"] * local_batch
    ring = 2 * (W - 1) / W * allreduce_bytes if W > 1 else 0.0
    return A2AEstimate(
        per_sample=per_sample,
        per_sample_max_rank=worst,
        local_batch=local_batch,
        per_step_per_rank=step_intra + step_inter,
        time_per_step_s=step_intra / cluster.intra_node_bw + step_inter / cluster.inter_node_bw,
        dense_allreduce_bytes_per_step=ring,
        dense_params=dense_params,
    )


