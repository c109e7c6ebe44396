"""Every backbone (the baseline presets) trains under DMP on 2 gloo ranks with table-wise twin
tables (ssem=ser, fused tables: the GPU path's kernels) and its training loss falls.
One process group for all backbones."""

from __future__ import annotations

import pytest

from tests.distributed._launch import run_gloo

BACKBONES = ["dnn", "widedeep", "deepfm", "dcn", "dcnv2", "xdeepfm", "autoint_plus", "afn_plus"]
SMALL = ["embedding_dim=8", "hard_hidden_units=[32,32]", "easy_hidden_units=[32]", "afn_hidden_units=[32]",
         "afn_neurons=8", "cin_layer_units=[8,8]", "attention_dim=8", "attention_heads=2", "net_dropout=0"]


@pytest.fixture(scope="module")
def synthetic_url(tmp_path_factory):
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path_factory.mktemp("data") / "synthetic")
    generate_synthetic(url, rows=6_000, fields=6, scale_vocab=0.02, seed=7, row_group_rows=1_000)
    return url


def _train_all(rank: int, world_size: int, url: str, out: str) -> dict:
    import torch

    from tf4ctr_dist.config import PRESETS_DIR, load_config
    from tf4ctr_dist.train.setup import build_training

    losses = {}
    for name in BACKBONES:
        cfg = load_config(PRESETS_DIR / f"{name}.yaml", [
            f"data.url={url}", f"out={out}", "cluster.workers=2", "train.batch_size=256", "ssem=ser",
            "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05", "emb_reg=0",
            "lr=0.003", *SMALL])
        parts = build_training(cfg, rank, world_size, torch.device("cpu"), splits=("train",))
        it = iter(parts.readers["train"].iter_epoch(0))
        per_step = []
        for _ in range(min(20, parts.readers["train"].num_batches(0))):
            loss, _, _, _ = parts.pipeline.progress(it)
            per_step.append(float(loss))
        tables = sorted({t.name.split("_")[0] for t in parts.tables})
        losses[name] = (per_step, tables)
    return losses


def test_every_backbone_trains_with_table_wise_twin_tables(synthetic_url, tmp_path):
    r0, r1 = run_gloo(_train_all, 2, synthetic_url, str(tmp_path / "run"), timeout=600)
    for name in BACKBONES:
        steps, tables = r0[name]
        assert "easy" in tables and "hard" in tables, name
        if name in ("widedeep", "deepfm", "xdeepfm"):
            assert "lr" in tables, name
        first, last = sum(steps[:4]) / 4, sum(steps[-4:]) / 4
        assert last < first, (name, steps)
