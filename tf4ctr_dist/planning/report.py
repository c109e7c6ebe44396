"""Text output of an offline plan (`tf4ctr plan`): per table, per rank and the all-to-all estimate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

from tf4ctr_dist.distributed.placement import DATA_PARALLEL
from tf4ctr_dist.planning.cluster import GB, GiB, KiB, MiB, _reservation_words

if TYPE_CHECKING:
    from tf4ctr_dist.planning.plan_sim import PlanReport

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
        + (" + data_parallel tables" if any(t.sharding_type == DATA_PARALLEL for t in report.tables) else "")
        + f", ring): {_b(a.dense_allreduce_bytes_per_step)}"
    )
    L.append("")
    L.append(A2A_FORMULA)
    for note in report.notes:
        L.append(f"note: {note}")
    return "\n".join(L)
