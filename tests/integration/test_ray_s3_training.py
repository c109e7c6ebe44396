"""Ray Train end to end: 2 workers stream a Parquet dataset from a local S3 server and train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.s3server import SECRET_KEY


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def test_two_ray_workers_train_from_s3(s3_server, ray_cluster, tmp_path):
    from data_tools.synthetic import generate_synthetic

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.train.launch import run_training

    url = s3_server.url("datasets", "synthetic-small")
    generate_synthetic(url, rows=20_000, fields=8, scale_vocab=0.05, seed=3, row_group_rows=2_000,
                       storage_options=s3_server.storage_options)
    out = tmp_path / "run"
    cfg = RunConfig().with_overrides([
        f"data.url={url}", f"out={out}", "name=ray-s3-test", "cluster.workers=2", "train.batch_size=512",
        "train.eval_batch_size=4096", "train.epochs=2", "train.monitor=[AUC]", "train.log_every=0",
        "easy_hidden_units=[32]", "hard_hidden_units=[32,32]", "embedding_dim=8",
        "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05",
    ])
    # Workers inherit AWS_* (endpoint + dummy keys) from this process's environment; the
    # config carries no credentials.
    result = run_training(cfg)

    manifest = load_manifest(url, storage_options=s3_server.storage_options)
    assert result["epochs"] == 2
    assert result["history"][0]["train_samples"] == manifest.splits["train"].rows
    assert result["test"]["samples"] == manifest.splits["test"].rows
    assert 0.6 < result["test"]["AUC"] < 1.0
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["test"] == result["test"]
    # train.blas_numerics=portable reached the workers before MKL started (the job's runtime_env).
    import os
    assert on_disk["numerics"]["mkl_cbwr"] == os.environ.get("MKL_CBWR", "AVX2")
    from tf4ctr_dist.train.launch import _has_avx2
    if "ATEN_CPU_CAPABILITY" not in os.environ and _has_avx2():  # torch's kernels too
        assert on_disk["numerics"]["cpu_capability"] == "AVX2"
    assert on_disk["numerics"]["device"] == "cpu" and on_disk["numerics"]["intra_op_threads"] >= 1
    # No credential reaches the run folder.
    for path in Path(out).rglob("*"):
        if path.is_file() and path.stat().st_size < 5_000_000:
            assert SECRET_KEY not in path.read_text(errors="ignore"), path
