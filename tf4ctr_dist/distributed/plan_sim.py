"""Offline sharding plans: what TorchRec's planner does with the TF4CTR tables on a cluster you
do not have (``python -m tf4ctr_dist plan --help``).

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
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from torchrec.distributed.planner import Topology
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

logger = logging.getLogger(__name__)

KiB, MiB, GiB = 2**10, 2**20, 2**30
GB = 1e9  # bandwidths are in decimal GB/s, as vendors quote them
RESERVED_FRACTION = 0.15  # TorchRec's default HeuristicalStorageReservation percentage
ID_BYTES = 8  # int64 ids
EMB_BYTES = 4  # fp32 pooled embeddings and their gradients
WEIGHT_BYTES = 4  # fp32 table weights

A2A_FORMULA = """\
all-to-all bytes per training sample, expected over the rank q the sample is on (uniform over W):
  for every shard s (on rank r_s, rows_s x cols_s) of table t (rows_t x d_t, L_t ids per sample):
    input ids : L_t * 8 * rows_s/rows_t  int64 ids q -> r_s (row shards get their share of ids;
                                         lengths/offsets are not counted)
    forward   : cols_s * 4               fp32 pooled output r_s -> q (a row shard sends a partial
                                         sum over all d_t columns: row_wise costs (W-1)*d_t*4)
    backward  : = forward                fp32 output gradient q -> r_s
  nothing moves when r_s == q; intra-node when r_s is on q's node, inter-node otherwise.
  table_row_wise: outputs are first reduced inside the owning node (intra-node), then d_t*4 goes
  to q (inter-node unless q is on that node); backward mirrors it.
  all tables table-wise: sum_t (W-1)/W * (L_t*8 + 2*d_t*4).
  per rank per step = local batch x per-sample bytes; time >= intra/intra_bw + inter/inter_bw.
  data_parallel tables move no ids: their gradients join the dense all-reduce
  (ring: 2*(W-1)/W * bytes per rank per step)."""


class PlanFitError(ValueError):
    """The tables cannot be placed on the described cluster (the message says how much is missing)."""


# ---- cluster description ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceType:
    """One accelerator kind as a node of a typical cloud instance sees it."""

    name: str
    compute_device: str  # TorchRec compute device: "cuda" or "cpu"
    hbm_bytes: int  # per device (what nvidia-smi reports); 0 for CPU workers
    ddr_per_node_bytes: int  # host memory of one node
    intra_node_bw: float  # bytes/s per rank, one direction (NVLink / shared memory)
    inter_node_bw: float  # bytes/s per rank, one direction (node NIC bandwidth / ranks per node)
    ranks_per_node: int
    note: str


DEVICE_TYPES: dict[str, DeviceType] = {
    d.name: d
    for d in (
        DeviceType("h100-80gb", "cuda", 81559 * MiB, 2048 * GiB, 450 * GB, 50 * GB, 8,
                   "H100 SXM 80 GB; NVLink 4 (900 GB/s both ways); 3200 Gb/s EFA per node (AWS p5.48xlarge)"),
        DeviceType("h200-141gb", "cuda", 143771 * MiB, 2048 * GiB, 450 * GB, 50 * GB, 8,
                   "H200 SXM 141 GB; NVLink 4; 3200 Gb/s EFA per node (AWS p5en.48xlarge)"),
        DeviceType("a100-80gb", "cuda", 81920 * MiB, 1152 * GiB, 300 * GB, 6.25 * GB, 8,
                   "A100 SXM 80 GB; NVLink 3 (600 GB/s both ways); 400 Gb/s EFA per node (AWS p4de.24xlarge)"),
        DeviceType("cpu", "cpu", 0, 128 * GiB, 10 * GB, 3.125 * GB, 1,
                   "CPU workers over gloo; 128 GiB host memory and 25 Gb/s network per node"),
    )
}


@dataclass(frozen=True)
class ClusterSpec:
    device: DeviceType
    world_size: int
    ranks_per_node: int
    hbm_per_rank: int
    ddr_per_rank: int
    intra_node_bw: float
    inter_node_bw: float
    node_size: int = 0  # ranks a whole node has (ranks_per_node is smaller for a job under one node)

    @classmethod
    def of(
        cls,
        device_type: str,
        world_size: int,
        ranks_per_node: Optional[int] = None,
        *,
        hbm_gib: Optional[float] = None,
        ddr_gib_per_node: Optional[float] = None,
        intra_node_gbps: Optional[float] = None,
        inter_node_gbps: Optional[float] = None,
    ) -> "ClusterSpec":
        """``device_type`` from DEVICE_TYPES; overrides in GiB and GB/s. On CPU, the ranks of one
        node default to all workers (one host)."""
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"unknown device type {device_type!r}; known: {', '.join(DEVICE_TYPES)}")
        dev = DEVICE_TYPES[device_type]
        if world_size < 1:
            raise ValueError(f"need at least one rank, got {world_size}")
        node_size = ranks_per_node or (world_size if dev.compute_device == "cpu" else dev.ranks_per_node)
        per_node = min(node_size, world_size)  # a job smaller than a node uses part of one
        if world_size % per_node:
            raise ValueError(
                f"{world_size} ranks do not fill whole nodes of {per_node}; "
                "give a multiple of the ranks per node (--gpus-per-node)"
            )
        hbm = int(hbm_gib * GiB) if hbm_gib is not None else dev.hbm_bytes
        ddr_node = int(ddr_gib_per_node * GiB) if ddr_gib_per_node is not None else dev.ddr_per_node_bytes
        return cls(
            device=dev,
            world_size=world_size,
            ranks_per_node=per_node,
            hbm_per_rank=hbm if dev.compute_device != "cpu" else 0,
            ddr_per_rank=ddr_node // node_size,
            intra_node_bw=intra_node_gbps * GB if intra_node_gbps else dev.intra_node_bw,
            inter_node_bw=inter_node_gbps * GB if inter_node_gbps else dev.inter_node_bw,
            node_size=node_size,
        )

    @property
    def nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    @property
    def on_gpu(self) -> bool:
        return self.device.compute_device != "cpu"

    def topology(self) -> Topology:
        return Topology(
            world_size=self.world_size,
            compute_device=self.device.compute_device,
            hbm_cap=self.hbm_per_rank if self.on_gpu else None,
            ddr_cap=self.ddr_per_rank,
            local_world_size=self.ranks_per_node,
            intra_host_bw=self.intra_node_bw / 1000,  # TorchRec: bytes per ms
            inter_host_bw=self.inter_node_bw / 1000,
        )

    def describe(self) -> str:
        mem = f"HBM {self.hbm_per_rank / GiB:.1f} GiB/rank, " if self.on_gpu else ""
        return (
            f"{self.world_size} x {self.device.name} ({self.nodes} node(s) x {self.ranks_per_node}); "
            f"{mem}DDR {self.ddr_per_rank / GiB:.0f} GiB/rank; per rank {self.intra_node_bw / GB:g} GB/s "
            f"intra-node, {self.inter_node_bw / GB:g} GB/s inter-node  [{self.device.note}]"
        )


# ---- field (vocabulary) inputs ----------------------------------------------------------------


@dataclass(frozen=True)
class FieldInput:
    name: str
    vocab_size: int  # embedding rows incl. PAD and OOV
    pooling_factor: float = 1.0  # ids per sample (1 for categorical fields)


def fields_from_vocab_sizes(sizes: Iterable[int], prefix: str = "C") -> list[FieldInput]:
    out = [FieldInput(f"{prefix}{i}", int(v)) for i, v in enumerate(sizes, 1)]
    _check_fields(out)
    return out


def fields_from_manifest(url: str) -> list[FieldInput]:
    """Vocabulary sizes of a prepared dataset; a sequence field counts max_len ids per sample
    (an upper bound: the manifest does not record mean lengths)."""
    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(url)
    return [
        FieldInput(f.name, f.vocab_size, float(f.max_len) if f.kind == "sequence" and f.max_len else 1.0)
        for f in manifest.fields
    ]


def fields_from_spec(path: str | Path) -> list[FieldInput]:
    """YAML/JSON spec: ``fields: [{name, vocab_size, pooling_factor?}, ...]``, ``fields: {name:
    vocab_size}`` or ``vocab_sizes: [...]``."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(raw, list):
        raw = {"fields": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with 'fields' or 'vocab_sizes'")
    if "vocab_sizes" in raw:
        return fields_from_vocab_sizes(raw["vocab_sizes"])
    items = raw.get("fields")
    if isinstance(items, dict):
        out = [FieldInput(str(k), int(v)) for k, v in items.items()]
    elif isinstance(items, list):
        out = []
        for i, f in enumerate(items):
            if not isinstance(f, dict) or "vocab_size" not in f:
                raise ValueError(f"{path}: fields[{i}] needs a vocab_size")
            out.append(FieldInput(str(f.get("name", f"C{i + 1}")), int(f["vocab_size"]),
                                  float(f.get("pooling_factor", 1.0))))
    else:
        raise ValueError(f"{path}: expected 'fields' (list or mapping) or 'vocab_sizes'")
    _check_fields(out)
    return out


def criteo_like_fields(total_rows: int, fields: int = 26, decay: float = 0.5) -> list[FieldInput]:
    """Split ``total_rows`` embedding rows over ``fields`` categorical fields with a Criteo-like
    skew: field i gets a share proportional to decay**i (decay 0.5: 50%, 25%, 12.5%, ... so the
    four largest fields hold ~94% of the rows, as in Criteo where a few id fields dominate), and at
    least 3 rows (PAD, one id, OOV). The largest field absorbs rounding, so the sizes sum exactly
    to ``total_rows``."""
    if fields < 1:
        raise ValueError(f"fields must be >= 1, got {fields}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if total_rows < 3 * fields:
        raise ValueError(f"total rows {total_rows:,} < 3 per field x {fields} fields")
    weights = [decay**i for i in range(fields)]
    norm = sum(weights)
    sizes = [max(3, int(total_rows * w / norm)) for w in weights]
    sizes[0] += total_rows - sum(sizes)
    return fields_from_vocab_sizes(sizes)


def _check_fields(fields: Sequence[FieldInput]) -> None:
    if not fields:
        raise ValueError("no fields given")
    for f in fields:
        if f.vocab_size < 2:
            raise ValueError(f"field {f.name}: vocab_size should be >= 2 (PAD + OOV), got {f.vocab_size}")
        if f.pooling_factor <= 0:
            raise ValueError(f"field {f.name}: pooling_factor should be > 0, got {f.pooling_factor}")
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise ValueError("field names are not unique")


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
    tables = embedding_tables(pairs, cfg.model)
    pf_by_feature = {f.name: f.pooling_factor for f in fields}
    pooling = {t.name: pf_by_feature[t.feature_names[0]] for t in tables if pf_by_feature[t.feature_names[0]] != 1.0}
    optimizer = cfg.train.embedding_optimizer
    placement = resolve_placement(cfg.train.sharding, optimizer, cluster.device.compute_device)
    if placement.fused and cfg.train.emb_reg > 0 and cfg.train.emb_reg_mode == "full":
        notes.append("training would refuse emb_reg_mode=full with fused (sharded) tables; use emb_reg_mode=touched")
    emb_lr = cfg.train.embedding_lr or cfg.train.lr
    sharders = make_sharders(placement, emb_lr, cfg.train.emb_reg if placement.fused else 0.0)

    module = TF4CTRTrain(tf4ctr(pairs, cfg.model, device="meta"), Objective(cfg.loss))
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


def _reservation_words(cluster: ClusterSpec) -> str:
    if cluster.on_gpu:
        return f"reserved by TorchRec: {RESERVED_FRACTION:.0%} margin + dense model x6 + input buffers"
    return "reserved by TorchRec for the dense model (x6)"


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


# ---- text output ------------------------------------------------------------------------------


def format_ranks(ranks: Sequence[int]) -> str:
    """[0,1,2,3,8] -> '0-3,8'."""
    out: list[str] = []
    rs = sorted(set(ranks))
    i = 0
    while i < len(rs):
        j = i
        while j + 1 < len(rs) and rs[j + 1] == rs[j] + 1:
            j += 1
        out.append(str(rs[i]) if i == j else f"{rs[i]}-{rs[j]}")
        i = j + 1
    return ",".join(out)


def _b(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,.1f} B"


def format_report(report: PlanReport, per_rank: Optional[bool] = None, max_rank_lines: int = 16) -> str:
    c = report.cluster
    W = c.world_size
    totals = report.to_dict()["totals"]
    twin = report.model["twin_tables"]
    d = report.model["embedding_dim"]
    L: list[str] = []
    L.append(
        f"model: {len(report.fields)} fields, {len(report.tables)} tables "
        + (f"(ssem=ser twin tables: easy_* dim {d // 2} + hard_* dim {d})" if twin else f"(dim {d})")
        + f"; {sum(f.vocab_size for f in report.fields):,} rows per field set, {totals['rows']:,} table rows, "
        f"{totals['parameters']:,} embedding parameters"
    )
    L.append(f"cluster: {c.describe()}")
    L.append(f"batch: global {report.global_batch:,} -> {report.local_batch:,} per rank")
    L.append(f"placement: {report.placement}")
    L.append(
        f"search: {report.search} ({report.search_note}); types searched: {', '.join(report.sharding_types_searched)}; "
        f"{report.num_proposals} proposals in {report.plan_seconds:.1f} s"
    )
    L.append("")
    L.append("plan per table:")
    width = max(len(t.name) for t in report.tables)
    L.append(f"  {'table':<{width}} {'rows':>13} x dim  {'sharding':<15} {'kernel':<7} {'shards':>6}  "
             f"{'state':>11}  ranks")
    for t in report.tables:
        L.append(
            f"  {t.name:<{width}} {t.rows:>13,} x {t.dim:<3}  {t.sharding_type:<15} {t.compute_kernel:<7} "
            f"{len(t.shards):>6}  {_b(t.state_bytes):>11}  {format_ranks(t.ranks)}"
        )
    counts: dict[str, int] = {}
    for t in report.tables:
        counts[t.sharding_type] = counts.get(t.sharding_type, 0) + 1
    L.append("  sharding types: " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    L.append("")
    mem_kind = "HBM" if c.on_gpu else "DDR"
    usable = report.ranks[0].usable
    L.append(
        f"memory per rank: capacity {_b(report.ranks[0].capacity)} {mem_kind}, {_b(usable)} usable for tables "
        f"({_b(report.ranks[0].capacity - usable)} {_reservation_words(c)})"
    )
    L.append(
        f"  table state = fp32 weights + {report.optimizer} state (from shard sizes); planner = TorchRec's "
        "per-shard estimate (state + its input/output buffers)"
    )
    show_all = per_rank if per_rank is not None else W <= max_rank_lines
    ranks = report.ranks
    key = (lambda r: r.planner_hbm) if c.on_gpu else (lambda r: r.planner_ddr)
    if show_all:
        shown = ranks
    else:
        shown = sorted(sorted(ranks, key=key, reverse=True)[:8], key=lambda r: r.rank)
        L.append(f"  (the 8 most loaded of {W} ranks; --per-rank prints all)")
    L.append(f"  {'rank':>5} {'planner HBM':>13} {'planner DDR':>13} {'table state':>13} {'of usable':>9}")
    for r in shown:
        L.append(
            f"  {r.rank:>5} {_b(r.planner_hbm):>13} {_b(r.planner_ddr):>13} {_b(r.table_state):>13} "
            f"{(key(r) / r.usable if r.usable else 0):>9.1%}"
        )
    vals = sorted(key(r) for r in ranks)
    states = sorted(r.table_state for r in ranks)
    L.append(
        f"  planner {mem_kind} over ranks: min {_b(vals[0])}, median {_b(vals[len(vals) // 2])}, max {_b(vals[-1])}; "
        f"table state: min {_b(states[0])}, median {_b(states[len(states) // 2])}, max {_b(states[-1])}"
    )
    L.append(
        f"  total table state {_b(totals['table_state_bytes'])} = weights {_b(totals['weight_bytes'])} + "
        f"optimizer {_b(totals['optimizer_state_bytes'])}; {totals['table_state_bytes'] / (usable * W or 1):.1%} "
        f"of the cluster's usable {mem_kind} ({_b(usable * W)})"
    )
    L.append("")
    a = report.a2a
    L.append("all-to-all per training sample (expected over the sample's rank):")
    names = {"ids": "input ids (fwd)", "fwd": "pooled embeddings (fwd)", "bwd": "embedding grads (bwd)",
             "total": "total"}
    for k in ("ids", "fwd", "bwd", "total"):
        v = a.per_sample[k]
        L.append(f"  {names[k]:<24} {v['all']:>12,.1f} B   (intra-node {v['intra']:>12,.1f} B, "
                 f"inter-node {v['inter']:>12,.1f} B)")
    L.append(f"  worst sample rank: {a.per_sample_max_rank:,.1f} B/sample")
    L.append(
        f"  per rank per step (local batch {a.local_batch:,}): {_b(a.per_step_per_rank)} -> >= "
        f"{a.time_per_step_s * 1e3:,.3f} ms at {c.intra_node_bw / GB:g}/{c.inter_node_bw / GB:g} GB/s intra/inter"
    )
    L.append(
        f"  dense gradient all-reduce per rank per step ({a.dense_params:,} dense params"
        + (" + data_parallel tables" if any(t.sharding_type == ShardingType.DATA_PARALLEL.value for t in report.tables) else "")
        + f", ring): {_b(a.dense_allreduce_bytes_per_step)}"
    )
    L.append("")
    L.append(A2A_FORMULA)
    for note in report.notes:
        L.append(f"note: {note}")
    return "\n".join(L)
