"""The dev-mode Ray cluster (no address given: `_init_ray` starts one) listens on 127.0.0.1
only: GCS, raylet, dashboard, agents, the driver and the workers. Runs in a fresh interpreter,
as a user's `tf4ctr train` does (Ray fixes the node address when it is first imported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.integration._ray_local import REPO, is_loopback

# A child that starts the dev cluster through launch._init_ray, brings up two workers and an
# actor, and prints the listening sockets of itself and all its descendants.
CHILD = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())
from tests.integration._ray_local import listening_sockets, process_tree
from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.train.launch import _init_ray

_init_ray(RunConfig())
import ray

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Probe:
    def pid(self):
        return os.getpid()

probe = Probe.remote()
workers = ray.get([pid.remote(), pid.remote(), probe.pid.remote()])
print("LISTENING " + json.dumps({"workers": workers, "sockets": listening_sockets(process_tree([os.getpid()]))}))
ray.shutdown()
"""


def test_dev_mode_cluster_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LISTENING "))
    found = json.loads(line.removeprefix("LISTENING "))
    sockets = found["sockets"]
    print("\nlistening sockets of the dev-mode cluster:")
    for s in sockets:
        print(f"  {s['name']:<16} pid {s['pid']:<7} {s['proto']:<4} {s['address']}:{s['port']}")

    names = {s["name"] for s in sockets}
    # The listing covers the parts that listen: a wrong listing (empty, or missing the core
    # servers) must not pass as "nothing on 0.0.0.0".
    assert {"gcs_server", "raylet"} <= names, names
    assert any(s["pid"] in found["workers"] for s in sockets), "no worker socket listed"
    assert any(n.startswith("ray::Dashboard") for n in names), names
    exposed = [s for s in sockets if not is_loopback(s["address"])]
    assert not exposed, exposed
