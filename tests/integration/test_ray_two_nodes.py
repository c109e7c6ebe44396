"""A two-node Ray cluster on this machine (a head and a node joined with `ray start --address`,
one CPU each) runs a training with one Ray Train worker on each node.

The driver runs in a fresh interpreter: Ray fixes a process's node address when it is first
imported, and earlier tests in the same pytest process may have imported it for a loopback-only
dev cluster, which cannot talk to nodes on the machine's address."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.integration._ray_local import REPO

CHILD = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
import ray
from ray.util.state import list_actors

from data_tools.synthetic import generate_synthetic
from tests.integration._ray_local import LocalCluster
from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.train.launch import run_training

tmp = sys.argv[1]
data_url = os.path.join(tmp, "data")
generate_synthetic(data_url, rows=4_000, fields=6, scale_vocab=1.0, seed=3, row_group_rows=1_000)
# One CPU per node and one per worker: the two workers cannot share a node.
# No token here (test_ray_job_submit covers it): a node joining with `ray start --address`
# does not pick up ~/.ray/auth_token the way a head does.
cluster = LocalCluster(env={"RAY_AUTH_MODE": "disabled"})
try:
    cluster.start_head(num_cpus=1, resources='{"node_a": 1}')
    cluster.add_node(num_cpus=1, resources='{"node_b": 1}')
    ray.init(address=cluster.gcs_address)
    nodes = {n["NodeID"]: sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]}
    cfg = RunConfig().with_overrides([
        f"data.url={data_url}", f"out={os.path.join(tmp, 'run')}", "name=two-nodes",
        f"cluster.ray_address={cluster.gcs_address}", "cluster.workers=2", "cluster.cpus_per_worker=1",
        "train.batch_size=512", "train.eval_batch_size=4096", "train.epochs=1", "train.log_every=0",
        "easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "embedding_dim=8", "sharding=table_wise",
        "embedding_optimizer=rowwise_adagrad", "checkpoint.enabled=false", "train.analyses=[]",
    ])
    result = run_training(cfg)
    workers = [a.node_id for a in list_actors(address=cluster.dashboard_url, detail=True, limit=1000)
               if a.class_name == "RayTrainWorker"]
finally:
    ray.shutdown()
    cluster.stop()
print("RESULT " + json.dumps({"nodes": nodes, "workers": workers, "test_auc": result["test"]["AUC"]}))
"""


def test_one_training_worker_on_each_of_two_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    # The driver's auth mode must be the cluster's: an earlier ray.init in this process with a
    # ~/.ray/auth_token on disk (test_ray_job_submit writes one) sets RAY_AUTH_MODE=token here,
    # and a token-auth driver cannot take the calls of a no-auth cluster (its actors are
    # cancelled before they start).
    env["RAY_AUTH_MODE"] = "disabled"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    nodes, workers = found["nodes"], found["workers"]
    assert len(nodes) == 2, nodes
    assert (tmp_path / "run" / "result.json").exists()
    assert math.isfinite(found["test_auc"])
    # One worker group of two, one worker on each node (by node id and by custom resource).
    assert len(workers) == 2, workers
    assert set(workers) == set(nodes), (workers, nodes)
    custom = {next(r for r in ("node_a", "node_b") if r in nodes[w]) for w in workers}
    assert custom == {"node_a", "node_b"}
