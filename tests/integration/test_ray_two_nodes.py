"""A two-node Ray cluster on this machine (a head and a node joined with `ray start --address`,
one CPU each) runs a training with one Ray Train worker on each node."""

from __future__ import annotations

import math

import pytest

from tests.integration._ray_local import LocalCluster


def _config(data_url: str, out, address: str):
    from tf4ctr_dist.config import RunConfig

    return RunConfig().with_overrides([
        f"data.url={data_url}", f"out={out}", "name=two-nodes", f"cluster.ray_address={address}",
        "cluster.workers=2", "cluster.cpus_per_worker=1", "train.batch_size=512", "train.eval_batch_size=4096",
        "train.epochs=1", "train.log_every=0", "easy_hidden_units=[16]", "hard_hidden_units=[16,16]",
        "embedding_dim=8", "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "checkpoint.enabled=false",
    ])


def test_one_training_worker_on_each_of_two_nodes(tmp_path):
    ray = pytest.importorskip("ray")
    from ray.util.state import list_actors

    from data_tools.synthetic import generate_synthetic
    from tf4ctr_dist.train.launch import run_training

    data_url = str(tmp_path / "data")
    generate_synthetic(data_url, rows=4_000, fields=6, scale_vocab=1.0, seed=3, row_group_rows=1_000)
    # One CPU per node and one per worker: the two workers cannot share a node.
    # No token here (test_ray_job_submit covers it): a node joining with `ray start --address`
    # does not pick up ~/.ray/auth_token the way a head does, and this driver's token would not
    # be the cluster's.
    cluster = LocalCluster(env={"RAY_AUTH_MODE": "disabled"})
    try:
        cluster.start_head(num_cpus=1, resources='{"node_a": 1}')
        cluster.add_node(num_cpus=1, resources='{"node_b": 1}')
        ray.init(address=cluster.gcs_address)
        nodes = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2, nodes
        result = run_training(_config(data_url, tmp_path / "run", cluster.gcs_address))
        workers = [a for a in list_actors(address=cluster.dashboard_url, detail=True, limit=1000)
                   if a.class_name == "RayTrainWorker"]
    finally:
        ray.shutdown()
        cluster.stop()

    assert (tmp_path / "run" / "result.json").exists()
    assert math.isfinite(result["test"]["AUC"])
    # One worker group of two, one worker on each node (by node id and by custom resource).
    assert len(workers) == 2, [(a.actor_id, a.state) for a in workers]
    placed = {a.node_id for a in workers}
    assert placed == set(nodes), (placed, set(nodes))
    custom = {next(r for r in ("node_a", "node_b") if r in nodes[a.node_id]["Resources"]) for a in workers}
    assert custom == {"node_a", "node_b"}
