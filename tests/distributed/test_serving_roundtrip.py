"""A model leaves a 2-worker run: `tf4ctr predict` and the exported artifact reproduce the
distributed model's own test predictions (per row, <= 1e-6) and its test AUC, for table-wise
and column-wise sharded tables; an export in tiny row blocks writes the same bytes while no read
from the checkpoint exceeds a block. (Row-wise takes the same export path, DCP reassembling the
rows, but needs a GPU backend: gloo cannot run it here.)"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.distributed._launch import run_gloo
from tests.serving_data import prepare

SMALL = ["easy_hidden_units=[16]", "hard_hidden_units=[16,16]", "embedding_dim=8"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("serving-rt"))


def _train_and_predict(rank: int, world_size: int, overrides: list[str]):
    """Train, then score the test split with the distributed model (best weights reloaded)."""
    import torch
    import torch.distributed as dist

    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.train.loop import WorkerContext, train_worker
    from tf4ctr_dist.train.resume import Checkpointing
    from tf4ctr_dist.train.setup import build_training

    cfg = RunConfig().with_overrides(overrides)
    ctx = WorkerContext(rank=rank, world_size=world_size, device=torch.device("cpu"))
    result = train_worker(cfg, ctx)
    parts = build_training(cfg, rank, world_size, ctx.device, splits=(cfg.data.test_split,))
    Checkpointing(cfg, ctx, parts.dmp, parts.optimizer, parts.plan_text).load_best()
    parts.dmp.eval()
    ids, probs = [], []
    with torch.no_grad():
        for batch in parts.readers[cfg.data.test_split].iter_epoch(0):
            _, (_, p, _, valid) = parts.dmp(batch)
            keep = valid > 0
            ids.append(batch.sample_ids[keep])
            probs.append(p[keep])
    mine = (torch.cat(ids).tolist(), torch.cat(probs).tolist())
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return result, gathered


# TorchRec cuts column-wise shards of 128 columns (its MIN_CW_DIM): with embedding_dim=256 the
# hard tables (256 wide) are saved as two column chunks, so column-wise really is column-wise.
@pytest.mark.parametrize("sharding, extra", [("table_wise", []), ("column_wise", ["embedding_dim=256"])],
                         ids=["table_wise", "column_wise"])
def test_predict_and_export_reproduce_the_run(dataset, tmp_path, sharding, extra):
    from sklearn.metrics import roc_auc_score

    from tf4ctr_dist.cli import main
    from tf4ctr_dist.serving import load

    url, (_, _, test_csv) = dataset
    run = tmp_path / "run"
    overrides = [f"data.url={url}", f"out={run}", "cluster.workers=2", "train.batch_size=256",
                 "train.eval_batch_size=512", "train.epochs=1", "train.monitor=[AUC]", "train.log_every=0",
                 f"sharding={sharding}", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05", *SMALL, *extra]
    (result, gathered), _ = run_gloo(_train_and_predict, 2, overrides, timeout=300)
    reference = np.zeros(1000, dtype=np.float64)
    seen = np.zeros(1000, dtype=bool)
    for ids, probs in gathered:
        reference[ids] = probs
        seen[ids] = True
    assert seen.all()
    run_auc = json.loads((run / "result.json").read_text())["test"]["AUC"]
    assert run_auc > 0.6  # it learned something: the scores carry the weights

    # predict --run on the prepared test split
    out = tmp_path / "scores.parquet"
    assert main(["predict", "--run", str(run), "--data", url, "--out", str(out)]) == 0
    scored = pq.read_table(out)
    assert scored.column_names == ["row", "label", "score"]
    rows = scored.column("row").to_numpy()
    np.testing.assert_array_equal(np.sort(rows), np.arange(1000))
    score = scored.column("score").to_numpy()
    assert np.abs(score - reference[rows]).max() <= 1e-6
    assert roc_auc_score(scored.column("label").to_numpy(), score) == pytest.approx(run_auc, abs=1e-9)

    # export -> load -> the raw test CSV through the saved vocabularies
    artifact = tmp_path / "model.tf4ctr"
    assert main(["export", "--run", str(run), "--out", str(artifact)]) == 0
    scorer = load(str(artifact))
    _blocks_give_the_same_artifact(run, artifact, sharding, tmp_path)
    import pyarrow.csv as pacsv

    raw = pacsv.read_csv(test_csv, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "label a b u".split()}))
    assert np.abs(scorer.score(raw) - reference).max() <= 1e-6

    # predict --model on the raw CSV: the same scores, label passed through
    raw_out = tmp_path / "raw.parquet"
    assert main(["predict", "--model", str(artifact), "--data", test_csv, "--out", str(raw_out)]) == 0
    raw_scored = pq.read_table(raw_out)
    assert raw_scored.column_names == ["row", "label", "score"]
    assert np.abs(raw_scored.column("score").to_numpy() - reference).max() <= 1e-6
    assert not list(tmp_path.glob("*.tmp-*"))  # written atomically, nothing left over

    # from_run (predict --run, serve --run) fills the model in place from row blocks: tiny blocks
    # (each table in many pieces) give the same scores as the export.
    from tf4ctr_dist.serving.export import from_run

    in_blocks = from_run(str(run), block_bytes=64)
    assert np.abs(in_blocks.score(raw) - reference).max() <= 1e-6
    if sharding == "table_wise":
        _a_manifest_that_does_not_fit_is_refused_before_allocating(run, url, tmp_path)


def _a_manifest_that_does_not_fit_is_refused_before_allocating(run, url, tmp_path):
    """The run's dataset, its manifest edited to 10^10 ids for the hashed field (a 320 GB table):
    from_run compares the model with the checkpoint on meta, so the refusal names the tensor
    instead of trying to allocate the table."""
    import shutil

    from tf4ctr_dist.config import ConfigError
    from tf4ctr_dist.serving.export import from_run

    data, copy = tmp_path / "edited-data", tmp_path / "edited-run"
    shutil.copytree(url, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (hashed,) = [f for f in manifest["fields"] if f["name"] == "u"]  # no vocabulary file to disagree first
    hashed["vocab_size"] = 10**10
    (data / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["url"] = str(data)
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"does not fit the run's model .*10000000000"):
        from_run(str(copy))


def _blocks_give_the_same_artifact(run, artifact, sharding, tmp_path):
    """Export with blocks of 64 bytes (a few rows of a table): bit-identical to the export in
    one block per table; every read from the checkpoint's shard files is at most one block, and
    each table's bytes are read once."""
    from collections import defaultdict

    from tf4ctr_dist.data.manifest import load_manifest
    from tf4ctr_dist.serving.export import CKPT_PREFIX, _best_entry, build_model, checkpoint_tensors, export_run, run_config

    small = tmp_path / "blocks.tf4ctr"
    with _CpuTensors() as made:
        export_run(str(run), str(small), block_bytes=64)
    assert small.read_bytes() == artifact.read_bytes()

    cfg = run_config(str(run))
    store, entry = _best_entry(str(run), cfg)
    saved = store.storage_reader(entry).read_metadata().state_dict_metadata
    tables = {k.removeprefix(CKPT_PREFIX): len(v.chunks) for k, v in saved.items()
              if k.startswith(CKPT_PREFIX) and "embedding_bags" in k}
    assert tables
    if sharding == "column_wise":  # the tables really are saved in several chunks
        assert max(tables.values()) > 1, tables

    reads, blocks = defaultdict(list), defaultdict(list)
    specs, produced = checkpoint_tensors(str(run), cfg, build_model(load_manifest(cfg.data.url), cfg), block_bytes=64,
                                         on_read=lambda key, n: reads[key.removeprefix(CKPT_PREFIX)].append(n))
    for key, block in produced:
        blocks[key].append(block.numel() * block.element_size())
    # export_run never held a table whole: no CPU tensor of a table's shape was made (building
    # the model on CPU to learn the shapes would allocate and initialise every table).
    whole = {key: specs[key][1] for key in tables if specs[key][1] in made.shapes}
    assert not whole, whole
    for key in tables:
        dtype, shape = specs[key]
        size = int(np.prod(shape)) * torch_size(dtype)
        row = size // shape[0]
        assert max(blocks[key]) <= max(64, row) and sum(blocks[key]) == size, key
        assert max(reads[key]) <= max(64, row) and sum(reads[key]) == size, key
        assert len(blocks[key]) > 1, key  # several blocks: the test reads tables in pieces


class _CpuTensors:
    """A context that records the shape of every CPU tensor any torch op returns inside it."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        shapes = self.shapes = set()

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                shapes.update(tuple(t.shape) for t in tree_leaves(out)
                              if isinstance(t, torch.Tensor) and t.device.type == "cpu")
                return out

        self._mode = Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def torch_size(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
