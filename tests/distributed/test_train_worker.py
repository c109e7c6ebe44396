"""The whole per-worker loop in two gloo processes: sharded twin tables, pipeline, eval, result."""

from __future__ import annotations

import json

import pytest

from tests.distributed._launch import run_gloo

SMALL_MODEL = ["easy_hidden_units=[64,64]", "hard_hidden_units=[64,64,64]", "embedding_dim=8"]


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory):
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_synthetic(url, rows=24_000, fields=8, scale_vocab=0.05, seed=7, row_group_rows=2_000)
    return url


def _train(rank: int, world_size: int, overrides: list[str]):
    import torch

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.train.loop import WorkerContext, train_worker

    cfg = RunConfig().with_overrides(overrides)
    ctx = WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu"))
    return train_worker(cfg, ctx)


def _overrides(url: str, out: str, *extra: str) -> list[str]:
    return [f"data.url={url}", f"out={out}", "cluster.workers=2", "train.batch_size=512",
            "train.eval_batch_size=4096", "train.epochs=2", "train.monitor=[AUC]", "train.log_every=0",
            *SMALL_MODEL, *extra]


@pytest.mark.parametrize(
    "placement",
    [
        ["sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05",
         "emb_reg=1e-5", "emb_reg_mode=touched"],
        ["sharding=data_parallel", "embedding_optimizer=adam", "emb_reg=1e-3", "emb_reg_mode=full",
         "loss=tce"],
        ["sharding=column_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05",
         "table_precision=fp16", "checkpoint.enabled=false", "cpu_kernels=off"],
    ],
    ids=["table_wise-rowwise_adagrad", "data_parallel-adam-tce", "column_wise-fp16-no_checkpoints-no_kernels"],
)
def test_two_workers_train_twin_tables(synthetic_url, tmp_path, placement):
    out = tmp_path / "run"
    results = run_gloo(_train, 2, _overrides(synthetic_url, str(out), *placement), timeout=240)
    r0, r1 = results
    # Every rank computed the same exact metrics from the gathered predictions.
    assert r0["valid"] == r1["valid"] and r0["test"] == r1["test"]
    # Every valid / test sample counted once.
    from tf4ctr_dist.data.manifest import load_manifest

    manifest = load_manifest(synthetic_url)
    assert r0["valid"]["samples"] == manifest.splits["valid"].rows
    assert r0["test"]["samples"] == manifest.splits["test"].rows
    history = r0["history"]
    assert history[0]["train_samples"] == manifest.splits["train"].rows
    # Learning happened: the loss fell and the model beats chance clearly on held-out data.
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert r0["test"]["AUC"] > 0.6
    # Twin tables: easy (d/2) and hard (d) tables in the plan, spread over both ranks.
    plan = (out / "plan.txt").read_text()
    assert "easy_C1" in plan and "hard_C1" in plan
    if "table_wise" in placement[0]:
        assert "ranks=[0]" in plan and "ranks=[1]" in plan
    dtype = "float16" if "table_precision=fp16" in placement else "float32"
    assert f"table weight dtype: {dtype}\n" in plan
    written = json.loads((out / "result.json").read_text())
    assert set(written) >= {"valid", "test", "epochs", "config"}
    assert written["test"]["AUC"] == pytest.approx(r0["test"]["AUC"])
    # Which compiled CPU kernels ran, in plan.txt and result.json (train.cpu_kernels, default auto).
    kernels = {"table_wise": ("auto", True, "tf4ctr"), "data_parallel": ("auto", True, "torch"),
               "column_wise": ("off", False, "fbgemm")}[placement[0].removeprefix("sharding=")]
    assert written["cpu_kernels"] == dict(zip(("setting", "bn_relu_dropout", "table_backward"), kernels))
    assert (f"cpu_kernels={kernels[0]}: BatchNorm/ReLU/dropout {'compiled kernel' if kernels[1] else 'eager ops'}, "
            f"table backward {kernels[2]}\n") in plan


def test_adam_cannot_be_fused_on_cpu(synthetic_url, tmp_path):
    with pytest.raises(RuntimeError, match="fused CPU kernels support only"):
        run_gloo(_train, 2, _overrides(synthetic_url, str(tmp_path / "r"), "sharding=table_wise",
                                       "embedding_optimizer=adam"), timeout=120)


def _lr_after_plateau(rank: int, world_size: int):
    import torch

    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.distributed.sharding import (
        leaf_optimizers, build_optimizer, resolve_placement, scale_lr, shard_model,
    )
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr

    fields = [("a", 10), ("b", 20)]
    cfg = ModelConfig(easy_hidden_units=[8], hard_hidden_units=[8])
    module = TF4CTRTrain(tf4ctr(fields, cfg, device="meta"), Objective(LossConfig()))
    placement = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    dmp, _ = shard_model(module, embedding_tables(fields, cfg), placement, device=torch.device("cpu"),
                         embedding_lr=0.01, embedding_weight_decay=0.0, local_batch_size=8)
    opt = build_optimizer(dmp, lr=1e-3, embedding_lr=0.01, emb_reg=0.0, emb_reg_mode="touched", clip_grad_norm=10)
    scale_lr(opt, 0.1, 1e-6)
    return sorted((type(leaf).__name__, round(g["lr"], 9)) for leaf in leaf_optimizers(opt) for g in leaf.param_groups)


def test_plateau_decay_reaches_fused_embedding_optimizers():
    (groups,) = run_gloo(_lr_after_plateau, 1, timeout=120)
    # Both fused table groups (easy, hard) and the dense Adam are scaled by 0.1.
    assert groups == [("Adam", 1e-4), ("EmbeddingFusedOptimizer", 1e-3), ("EmbeddingFusedOptimizer", 1e-3)]
