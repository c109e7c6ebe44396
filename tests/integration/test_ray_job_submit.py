"""`ray job submit` as the README documents it: a head node started with `ray start` from the
venv (so the job's `python` is the venv's), token authentication, the job submitted through
Ray's job-submission API with cluster/runtime_env.yaml, and the job's run folder checked."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration._ray_local import REPO, LocalCluster

pytest.importorskip("ray.job_submission")


def test_job_submitted_to_a_local_token_cluster_succeeds(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    token = secrets.token_hex(16)
    venv_bin = str(Path(sys.executable).parent)
    cluster = LocalCluster(env={
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the README's loopback-only head
        # What `source .venv/bin/activate` does for `ray start`: the job's `python` is the venv's.
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
    })
    out = tmp_path / "run"
    try:
        cluster.start_head(num_cpus=3)
        # Without the token the dashboard refuses the request.
        with pytest.raises(Exception, match="(?i)401|unauthori|auth"):
            JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": "Bearer wrong"}).list_jobs()
        client = JobSubmissionClient(cluster.dashboard_url, headers={"Authorization": f"Bearer {token}"})

        runtime_env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
        runtime_env["working_dir"] = str(REPO)
        job_id = client.submit_job(
            entrypoint=(f"python -c 'import sys; print(\"job python:\", sys.executable)' && "
                        f"python jobs/criteo_full.py --synthetic-rows 8000 --out {out} epochs=1 "
                        "batch_size=1024 eval_batch_size=8192 easy_hidden_units=[32] "
                        "hard_hidden_units=[32,32] embedding_dim=8 log_every=0"),
            runtime_env=runtime_env,
        )
        deadline = time.monotonic() + 240
        status = client.get_job_status(job_id)
        while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
            time.sleep(2)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id}: {status}\n{logs[-4000:]}"
    finally:
        cluster.stop()

    assert f"job python: {sys.executable}" in logs or f"job python: {venv_bin}" in logs, logs[:2000]
    result = json.loads((out / "result.json").read_text())
    assert result["epochs"] == 1
    for split in ("valid", "test"):
        assert math.isfinite(result[split]["AUC"]) and 0.0 < result[split]["AUC"] < 1.0
