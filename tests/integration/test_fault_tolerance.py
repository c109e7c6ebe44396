"""Ray Train fault tolerance: workers SIGKILLed at three points (first epoch, mid-epoch of a
later epoch, during a checkpoint write) are restarted by FailureConfig and the run resumes from
its last committed checkpoint (on a local S3 server): every training sample of every epoch is
used exactly once, and the result equals an uninterrupted run's exactly."""

from __future__ import annotations

import json

import pytest

FAULTS = "step@1:7:1,step@2:10:0,checkpoint@3:4:1"


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_synthetic(url, rows=16_000, fields=6, scale_vocab=1.0, seed=5, row_group_rows=1_000)
    return url


def _config(data_url: str, out, ckpt_root: str, name: str):
    from tf4ctr_dist.config import RunConfig

    return RunConfig().with_overrides([
        f"data.url={data_url}", f"out={out}", f"name={name}", f"checkpoint.root={ckpt_root}",
        "checkpoint.every_steps=4", "checkpoint.count_samples=true", "cluster.workers=2",
        "cluster.max_failures=3", "train.batch_size=512", "train.eval_batch_size=4096", "train.epochs=3",
        "train.monitor=[AUC]", "train.log_every=0", "easy_hidden_units=[32,32]", "hard_hidden_units=[32,32,32]",
        "embedding_dim=8", "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05",
        "emb_reg=1e-5", "emb_reg_mode=touched",
    ])


def test_sigkilled_workers_resume_exactly(s3_server, data_url, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.train.launch import run_training

    # Ray workers of the local cluster inherit this environment (and the AWS_* of s3_server).
    monkeypatch.setenv("TF4CTR_FAULTS", FAULTS)
    monkeypatch.setenv("TF4CTR_FAULTS_DIR", str(tmp_path / "fired"))
    try:
        faulty = run_training(_config(data_url, tmp_path / "faulty", s3_server.url("ckpt", "faulty"), "faulty"))
        fired = sorted(p.name for p in (tmp_path / "fired").iterdir())
        assert fired == sorted(FAULTS.split(",")), fired  # all three crashes happened
        # Same settings, no crash left to fire (each fault fires once).
        clean = run_training(_config(data_url, tmp_path / "clean", s3_server.url("ckpt", "clean"), "clean"))
    finally:
        ray.shutdown()

    rows = load_manifest(data_url).splits["train"].rows
    assert len(faulty["history"]) == 3
    for record in faulty["history"]:
        assert record["sample_use"] == {"rows": rows, "unused": 0, "once": rows, "more": 0}
    assert [h["train_loss"] for h in faulty["history"]] == [h["train_loss"] for h in clean["history"]]
    assert faulty["test"] == clean["test"]  # exact: CPU training is deterministic here
    assert faulty["valid"] == clean["valid"]
    # The run folder tells what happened: one metrics line per epoch despite the restarts.
    lines = (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
