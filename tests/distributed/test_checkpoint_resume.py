"""Checkpoints in two gloo processes: a crashed run resumed from its checkpoint ends exactly like
an uninterrupted one; every training sample is used once per epoch; world-size changes either
reshard (epoch-end checkpoint) or fail clearly (mid-epoch)."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.distributed._launch import run_gloo

SMALL_MODEL = ["easy_hidden_units=[32,32]", "hard_hidden_units=[32,32,32]", "embedding_dim=8"]


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_synthetic(url, rows=12_000, fields=6, scale_vocab=1.0, seed=11, row_group_rows=1_000)
    return url


def _train(rank: int, world_size: int, overrides: list[str], env: dict):
    import os

    import torch

    os.environ.update(env)
    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.train.loop import WorkerContext, train_worker

    cfg = RunConfig().with_overrides(overrides)
    return train_worker(cfg, WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu")))


def _overrides(url: str, out: str, workers: int = 2, *extra: str) -> list[str]:
    return [f"data.url={url}", f"out={out}", f"cluster.workers={workers}", "train.batch_size=512",
            "train.eval_batch_size=4096", "train.epochs=3", "train.patience=1", "train.monitor=[AUC]",
            "train.log_every=0", "sharding=table_wise", "embedding_optimizer=rowwise_adagrad",
            "embedding_lr=0.05", "emb_reg=1e-5", "emb_reg_mode=touched", "checkpoint.every_steps=4",
            "checkpoint.count_samples=true", *SMALL_MODEL, *extra]


def _index(out) -> list[dict]:
    return json.loads((out / "checkpoints" / "index.json").read_text())["checkpoints"]


@pytest.fixture(scope="module")
def uninterrupted(data_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "clean"
    r0, r1 = run_gloo(_train, 2, _overrides(data_url, str(out)), {}, timeout=300)
    assert r0["test"] == r1["test"]
    return out, r0


def _losses(result: dict) -> list[float]:
    return [h["train_loss"] for h in result["history"]]


def test_every_sample_once_and_checkpoints_kept(uninterrupted, data_url):
    from tf4ctr_dist.data.manifest import load_manifest

    out, result = uninterrupted
    rows = load_manifest(data_url).splits["train"].rows
    for record in result["history"]:
        assert record["sample_use"] == {"rows": rows, "unused": 0, "once": rows, "more": 0}
    entries = _index(out)
    # keep=2 most recent plus the best; the last one closes the run.
    assert entries[-1]["finished"] and entries[-1]["step"] == 0
    assert len(entries) <= 3 and any(e["best"] for e in entries)
    folders = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert folders == sorted(e["name"] for e in entries)


def test_crash_then_relaunch_resumes_exactly(uninterrupted, data_url, tmp_path):
    _, clean = uninterrupted
    out = tmp_path / "crashy"
    env = {"TF4CTR_FAULTS": "step@2:6:1", "TF4CTR_FAULTS_DIR": str(tmp_path / "markers")}
    with pytest.raises(RuntimeError):  # rank 1 was killed; rank 0 loses its peer
        run_gloo(_train, 2, _overrides(data_url, str(out)), env, timeout=300)
    latest = _index(out)[-1]
    assert (latest["epoch"], latest["step"]) == (1, 4)  # epoch 2, after batch 4: the last commit
    shutil.copytree(out, tmp_path / "mid-epoch-copy")
    # The same command again (the fault has fired) continues from epoch 2, batch 5.
    r0, _ = run_gloo(_train, 2, _overrides(data_url, str(out)), env, timeout=300)
    assert _losses(r0) == _losses(clean)
    assert r0["test"] == clean["test"] and r0["valid"] == clean["valid"]
    assert [h["sample_use"] for h in r0["history"]] == [h["sample_use"] for h in clean["history"]]

    # Mid-epoch positions belong to 2 workers: one worker must refuse, naming the fix.
    with pytest.raises(RuntimeError, match="mid-epoch by 2 workers.*cluster.workers=2"):
        run_gloo(_train, 1, _overrides(data_url, str(tmp_path / "mid-epoch-copy"), 1), {}, timeout=300)


def test_epoch_end_checkpoint_reshards_to_one_worker(uninterrupted, data_url, tmp_path):
    out, clean = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # The finished run's final checkpoint loads into one worker holding every table.
    (r,) = run_gloo(_train, 1, _overrides(data_url, str(copy), 1), {}, timeout=300)
    assert r["test"]["AUC"] == pytest.approx(clean["test"]["AUC"], abs=1e-6)
    assert r["history"] == clean["history"]


def test_changed_settings_are_refused(uninterrupted, data_url, tmp_path):
    out, _ = uninterrupted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(RuntimeError, match="other settings.*embedding_dim"):
        run_gloo(_train, 2, _overrides(data_url, str(copy), 2, "embedding_dim=16"), {}, timeout=300)


def test_warm_start_takes_the_best_weights(uninterrupted, data_url, tmp_path):
    out, clean = uninterrupted
    # No training: the new run evaluates exactly the source run's best weights.
    r0, _ = run_gloo(_train, 2, _overrides(data_url, str(tmp_path / "warm"), 2, "epochs=0",
                                           f"checkpoint.warm_start={out}"), {}, timeout=300)
    assert r0["test"] == clean["test"]
    # Other table sizes cannot take these weights: the error names a table and both shapes.
    from data_tools.synthetic import generate_synthetic

    other = str(tmp_path / "other-data")
    generate_synthetic(other, rows=3_000, fields=6, scale_vocab=2.0, seed=11, row_group_rows=1_000)
    with pytest.raises(RuntimeError, match=r"does not fit this model.*easy_C1.weight: checkpoint \(60, 4\) vs model \(120, 4\)"):
        run_gloo(_train, 2, [*_overrides(other, str(tmp_path / "bad"), 2, "epochs=0"),
                             f"checkpoint.warm_start={out}/checkpoints"], {}, timeout=300)
