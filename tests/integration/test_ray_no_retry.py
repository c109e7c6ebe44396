"""Errors that no restart can fix end a Ray Train run at once, even with max_failures > 0: a
corrupt Parquet part (a DataError inside the workers) starts the worker group once, not
1 + max_failures times."""

from __future__ import annotations

import time

import pytest


def test_data_error_in_a_worker_is_not_retried(tmp_path):
    ray = pytest.importorskip("ray")
    from data_tools.synthetic import generate_synthetic
    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.data.errors import DataError
    from tf4ctr_dist.train.launch import run_training

    data_url = tmp_path / "data"
    generate_synthetic(str(data_url), rows=4_000, fields=6, scale_vocab=1.0, seed=4, row_group_rows=1_000)
    part = next((data_url / "train").glob("*.parquet"))
    part.write_bytes(b"this is not parquet " * (part.stat().st_size // 20 + 1))
    cfg = RunConfig().with_overrides([
        f"data.url={data_url}", f"out={tmp_path / 'run'}", "name=no-retry", "cluster.workers=2",
        "cluster.max_failures=3", "train.batch_size=512", "train.epochs=1", "train.log_every=0",
        "easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "embedding_dim=8", "checkpoint.enabled=false",
    ])
    try:
        start = time.monotonic()
        with pytest.raises(DataError) as info:
            run_training(cfg)
        elapsed = time.monotonic() - start
        from ray.util.state import list_actors

        # This run's own cluster by address: another Ray cluster may be running on the machine.
        gcs = ray.get_runtime_context().gcs_address
        actors = list_actors(address=gcs, detail=True, limit=1000)
        groups_started = len([a for a in actors if a.class_name == "RayTrainWorker"]) / 2
    finally:
        ray.shutdown()
    assert part.name in str(info.value)
    print(f"\nDataError after {elapsed:.1f} s, {groups_started:g} worker group(s) started")
    assert groups_started == 1  # the DataError was not retried (3 restarts allowed)
