"""Offline sharding plans (tf4ctr_dist.distributed.plan_sim and `python -m tf4ctr_dist plan`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tf4ctr_dist.cli import main as cli_main
from tf4ctr_dist.config import load_config
from tf4ctr_dist.planning import plan_sim
from tf4ctr_dist.planning.plan_sim import (
    ClusterSpec,
    PlanFitError,
    TablePlan,
    criteo_like_fields,
    estimate_a2a,
    fields_from_vocab_sizes,
    simulate_plan,
)
from tf4ctr_dist.config import PRESETS_DIR as CONFIGS

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def cfg(*overrides: str):
    return load_config(CONFIGS / "criteo_x4.yaml", list(overrides))


def h100(world: int, per_node: int = 8) -> ClusterSpec:
    return ClusterSpec.of("h100-80gb", world, per_node)


# ---- memory -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer, bytes_per_row",
    [
        ("adam", 8 * 4 + 8 * 8),  # fp32 weights + 2 fp32 states per element
        ("rowwise_adagrad", 8 * 4 + 4),  # + 1 fp32 per row
        ("sgd", 8 * 4),
    ],
)
def test_memory_per_rank_sums_to_table_bytes(optimizer, bytes_per_row):
    sizes = [1000, 500, 300]
    report = simulate_plan(
        fields_from_vocab_sizes(sizes),
        cfg("ssem=share", "embedding_dim=8", "sharding=table_wise", f"embedding_optimizer={optimizer}"),
        h100(2),
        batch_size=64,
    )
    expected = sum(sizes) * bytes_per_row
    assert sum(r.table_state for r in report.ranks) == expected
    assert sum(t.state_bytes for t in report.tables) == expected
    assert [t.sharding_type for t in report.tables] == ["table_wise"] * 3
    for t in report.tables:
        assert t.state_bytes == t.rows * bytes_per_row
        assert len(t.ranks) == 1
        # TorchRec's estimate = the same state (optimizer included) + small input/output buffers
        assert t.state_bytes <= t.planner_hbm < t.state_bytes + 2**20
    for r in report.ranks:
        assert r.planner_hbm >= r.table_state
        assert r.planner_ddr == 0
    assert report.local_batch == 32


def test_twin_tables_easy_half_dim_hard_full_dim():
    sizes = [1000, 200]
    report = simulate_plan(
        fields_from_vocab_sizes(sizes), cfg("ssem=ser", "embedding_dim=8", "sharding=table_wise"), h100(2),
        batch_size=64,
    )
    dims = {t.name: t.dim for t in report.tables}
    assert dims == {"easy_C1": 4, "easy_C2": 4, "hard_C1": 8, "hard_C2": 8}
    # Adam: 12 bytes per element; easy + hard = 4 + 8 elements per row
    assert sum(r.table_state for r in report.ranks) == sum(sizes) * (4 + 8) * 12
    assert report.to_dict()["model"]["twin_tables"] is True


def test_data_parallel_on_cpu_replicates_every_table():
    sizes = [100, 50]
    c = ClusterSpec.of("cpu", 2)
    report = simulate_plan(fields_from_vocab_sizes(sizes), cfg("ssem=share", "embedding_dim=8"), c, batch_size=64)
    assert {t.sharding_type for t in report.tables} == {"data_parallel"}  # Adam on CPU
    per_rank = sum(sizes) * 8 * 12
    assert [r.table_state for r in report.ranks] == [per_rank, per_rank]
    assert report.a2a.per_sample["total"]["all"] == 0
    assert report.a2a.dense_allreduce_bytes_per_step > 0


# ---- all-to-all -------------------------------------------------------------------------------


def test_a2a_table_wise_matches_hand_computed():
    report = simulate_plan(
        fields_from_vocab_sizes([1000, 500]), cfg("ssem=share", "embedding_dim=8", "sharding=table_wise"), h100(2),
        batch_size=64,
    )
    # per table: (W-1)/W * (8 B of ids + 32 B fwd + 32 B bwd) = 36 B, all inside the node
    total = report.a2a.per_sample["total"]
    assert total["all"] == pytest.approx(72.0)
    assert total["intra"] == pytest.approx(72.0) and total["inter"] == 0
    assert report.a2a.per_sample["ids"]["all"] == pytest.approx(8.0)
    assert report.a2a.per_step_per_rank == pytest.approx(72.0 * 32)


def _table(sharding_type: str, shards, rows=100, dim=4) -> TablePlan:
    return TablePlan("t", "f", rows, dim, 1.0, sharding_type, "fused", shards, 0, 0, 0)


def test_a2a_two_nodes_hand_computed():
    c = ClusterSpec.of("h100-80gb", 4, 2)  # 2 nodes x 2 ranks
    # table-wise on rank 0: q=0 local, q=1 intra, q=2,3 inter; 8 + 16 + 16 = 40 B each
    a = estimate_a2a([_table("table_wise", [(100, 4, 0)])], c, local_batch=10)
    assert a.per_sample["total"]["intra"] == pytest.approx(40 / 4)
    assert a.per_sample["total"]["inter"] == pytest.approx(40 * 2 / 4)
    # row-wise over 4 ranks: ids 2 B per shard, each shard sends a 16 B partial sum
    a = estimate_a2a([_table("row_wise", [(25, 4, r) for r in range(4)])], c, local_batch=10)
    assert a.per_sample["ids"]["intra"] == pytest.approx(2) and a.per_sample["ids"]["inter"] == pytest.approx(4)
    assert a.per_sample["fwd"]["all"] == pytest.approx(3 * 16)  # (W-1) * d * 4
    assert a.per_sample["total"]["all"] == pytest.approx(6 + 2 * 48)
    # table-row-wise on node 0 (ranks 0, 1): reduce in the node, then 16 B to the other node
    a = estimate_a2a([_table("table_row_wise", [(50, 4, 0), (50, 4, 1)])], c, local_batch=10)
    assert a.per_sample["ids"]["intra"] == pytest.approx(2) and a.per_sample["ids"]["inter"] == pytest.approx(4)
    assert a.per_sample["fwd"]["intra"] == pytest.approx(16) and a.per_sample["fwd"]["inter"] == pytest.approx(8)
    assert a.per_sample["total"]["all"] == pytest.approx(6 + 2 * 24)
    assert a.per_step_per_rank == pytest.approx(10 * 54)


# ---- inputs and errors ------------------------------------------------------------------------


def test_criteo_like_split_is_exact_and_skewed():
    fields = criteo_like_fields(10**9, 26)
    sizes = [f.vocab_size for f in fields]
    assert sum(sizes) == 10**9 and len(sizes) == 26 and min(sizes) >= 3
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 0.45 * 10**9


def test_too_few_gpus_gives_memory_needed_vs_available():
    with pytest.raises(PlanFitError) as info:
        simulate_plan(fields_from_vocab_sizes([2_000_000_000]), cfg(), h100(2), batch_size=64)
    msg = str(info.value)
    # 2e9 rows x (8 + 16) dims x 12 B = 536.4 GiB needed; 2 x ~67.7 GiB available
    assert "536.4 GiB" in msg and "needed" in msg and "available" in msg
    assert "at least 8 ranks" in msg


def test_table_larger_than_a_gpu_with_table_wise_only():
    # ~100 GiB of Adam state in one table: fits 2 GPUs in total, not one
    with pytest.raises(PlanFitError, match="cannot split the large tables"):
        simulate_plan(
            fields_from_vocab_sizes([560_000_000]), cfg("ssem=share", "sharding=table_wise"), h100(2), batch_size=64
        )


@pytest.mark.parametrize("world, dropped", [(16, True), (2, False)])  # 16: 2 nodes of 8; 2: inside one node
def test_fast_search_drops_row_wise_only_across_nodes(world, dropped):
    report = simulate_plan(fields_from_vocab_sizes([10_000]), cfg("ssem=share"), h100(world), batch_size=64)
    assert ("row_wise" not in report.sharding_types_searched) == dropped
    assert "table_row_wise" in report.sharding_types_searched
    full = simulate_plan(fields_from_vocab_sizes([10_000]), cfg("ssem=share"), h100(world), batch_size=64,
                         search="full")
    assert "row_wise" in full.sharding_types_searched


def test_batch_must_divide_over_ranks():
    with pytest.raises(ValueError, match="divide evenly"):
        simulate_plan(fields_from_vocab_sizes([100]), cfg(), h100(3, 3), batch_size=64)


def test_format_ranks():
    assert plan_sim.format_ranks([8, 0, 1, 2, 3, 5]) == "0-3,5,8"


def test_cli_in_process_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", "--vocab-sizes", "1000,500", "--gpus", "2", "--batch-size", "64", "--json", str(out),
                   "ssem=share", "embedding_dim=8", "sharding=table_wise"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "plan per table" in text and "all-to-all per training sample" in text
    data = json.loads(out.read_text())
    assert data["totals"]["table_state_bytes"] == 1500 * 8 * 12
    assert data["a2a"]["per_sample"]["total"]["all"] == pytest.approx(72.0)


def test_cli_reports_no_fit_clearly(capsys):
    rc = cli_main(["plan", "--vocab-sizes", "2000000000", "--gpus", "2", "--batch-size", "64"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "do not fit" in err and "needed" in err and "available" in err


# ---- the 1e9-row plan, as a user runs it -------------------------------------------------------


@pytest.mark.slow  # ~10-15 s of CPU: imports + TorchRec's planner over 64 ranks
def test_cli_one_billion_rows_twin_tables_on_64_h100(tmp_path):
    out = tmp_path / "plan.json"
    cmd = [sys.executable, "-m", "tf4ctr_dist", "plan", "--synthetic-rows-total", "1000000000", "--fields", "26",
           "--gpus", "64", "--gpus-per-node", "8", "--gpu-type", "h100-80gb", "--batch-size", "65536",
           "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    names = [t["name"] for t in data["tables"]]
    assert len(names) == 52 and sum(n.startswith("easy_") for n in names) == 26
    assert sum(n.startswith("hard_") for n in names) == 26
    expected = 10**9 * (8 + 16) * 12  # fp32 weights + Adam, easy dim 8 + hard dim 16
    assert data["totals"]["table_state_bytes"] == expected
    ranks = data["memory_per_rank"]
    assert len(ranks) == 64 and sum(r["table_state"] for r in ranks) == expected
    assert all(r["planner_hbm"] <= r["usable"] for r in ranks)
    assert data["a2a"]["per_sample"]["total"]["all"] > 0
    assert data["plan_seconds"] < 60, data["plan_seconds"]
    assert "memory per rank" in proc.stdout
    print(f"1e9-row plan on 64 x H100: {elapsed:.1f} s wall, planner {data['plan_seconds']:.1f} s")
