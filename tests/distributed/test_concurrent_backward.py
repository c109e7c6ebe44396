"""The two table sets' backward on two threads (one CPU worker, fused tables): switched on by
shard_model where it is safe and useful (fbgemm's single-threaded table kernel; not with this
package's table kernel, which has the threads), and training through the sharded model ends in
exactly the same tables, optimizer state and dense weights as the sequential backward."""

from __future__ import annotations

import numpy as np
import torch

from tests.distributed.test_dense_tables import FIELDS, GLOBAL_BATCH, _global_batches, _make_batch
from tf4ctr_dist.distributed.spawn import spawn

STEPS = 4


def _model_cfg():
    from tf4ctr_dist.config import ModelConfig

    return ModelConfig(embedding_dim=8, ssem="ser", dfm="wsf", easy_hidden_units=[16],
                       hard_hidden_units=[16, 8], net_dropout=0.2, batch_norm=True)


def _state(dmp, optimizer) -> dict:
    """numpy copies of the model's tensors (local shards) and of the fused optimizer state."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def local(t):
        if isinstance(t, ShardedTensor):
            return np.concatenate([s.tensor.detach().numpy().ravel() for s in t.local_shards()])
        return t.detach().numpy().copy() if isinstance(t, torch.Tensor) else None

    out = {f"model/{k}": local(v) for k, v in dmp.state_dict().items()}
    for k, v in optimizer.state_dict()["state"].items():
        for name, t in v.items():
            if local(t) is not None:
                out[f"opt/{k}/{name}"] = local(t)
    return out


def _train(rank: int, world: int, batches: list[dict]) -> dict:
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.distributed.sharding import build_optimizer, resolve_placement, shard_model
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr
    from tf4ctr_dist.modules import concurrent

    calls = {"n": 0}
    real = concurrent._ConcurrentBackward.backward

    def counting(ctx, *grads):
        calls["n"] += 1
        return real(ctx, *grads)

    concurrent._ConcurrentBackward.backward = staticmethod(counting)
    tables = embedding_tables(FIELDS, _model_cfg())
    fused = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    out: dict = {"threads": torch.get_num_threads(), "switch": {}}
    for name, switch in (("on", True), ("off", False)):
        torch.manual_seed(11)
        module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
        dmp, _ = shard_model(module, tables, fused, device=torch.device("cpu"), embedding_lr=0.05,
                             embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH,
                             concurrent_table_backward=switch)
        out["switch"][name] = module.model.concurrent_table_backward
        opt = build_optimizer(dmp, lr=0.01, embedding_lr=0.05, emb_reg=0.0, emb_reg_mode="touched",
                              clip_grad_norm=10.0)
        before = calls["n"]
        out[f"{name}/init"] = _state(dmp, opt)
        dmp.train()
        for step, data in enumerate(batches):
            torch.manual_seed(100 + step)  # the same dropout masks in both runs
            opt.zero_grad()
            loss, _ = dmp(_make_batch(data, 0, GLOBAL_BATCH))
            loss.backward()
            opt.step()
        out[f"{name}/calls"] = calls["n"] - before
        out[name] = _state(dmp, opt)
    # The default: on only for fbgemm's single-threaded table kernel, and where it is safe.
    from tf4ctr_dist.kernels import load

    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    shard_model(module, tables, fused, device=torch.device("cpu"), embedding_lr=0.05,
                embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH, table_kernel=load("on"))
    out["switch"]["auto_table_kernel"] = module.model.concurrent_table_backward
    # no table kernel given (cpu_kernels=off): fbgemm's kernel
    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    shard_model(module, tables, fused, device=torch.device("cpu"), embedding_lr=0.05,
                embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH)
    out["switch"]["auto_fbgemm"] = module.model.concurrent_table_backward
    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    shard_model(module, tables, resolve_placement("data_parallel", "adam", "cpu"), device=torch.device("cpu"),
                embedding_lr=0.05, embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH)
    out["switch"]["data_parallel"] = module.model.concurrent_table_backward
    torch.set_num_threads(1)
    module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
    shard_model(module, tables, fused, device=torch.device("cpu"), embedding_lr=0.05,
                embedding_weight_decay=0.0, local_batch_size=GLOBAL_BATCH)
    out["switch"]["one_thread"] = module.model.concurrent_table_backward
    return out


def test_concurrent_table_backward_trains_exactly_like_sequential():
    r = spawn(_train, 1, _global_batches(STEPS, seed=5), backend="gloo", threads=2, timeout=240)[0]
    assert r["threads"] == 2
    assert r["switch"] == {"on": True, "off": False, "auto_table_kernel": False, "auto_fbgemm": True,
                           "data_parallel": False, "one_thread": False}
    assert r["on/calls"] == STEPS and r["off/calls"] == 0
    on, off = r["on"], r["off"]
    assert r["on/init"].keys() == r["off/init"].keys()
    for key in r["off/init"]:  # the same start
        np.testing.assert_array_equal(r["on/init"][key], r["off/init"][key], err_msg=key)
    assert on.keys() == off.keys()
    for key in off:  # the same end, bit for bit
        np.testing.assert_array_equal(on[key], off[key], err_msg=key)
    # Both table sets and their row-wise Adagrad state moved (the fused updates ran).
    tables = [k for k in off if "embedding_bags" in k and k.startswith("model/")]
    assert any("hard" in k for k in tables) and any("easy" in k for k in tables)
    for key in tables:
        assert not np.array_equal(off[key], r["off/init"][key]), key
    assert any(k.startswith("opt/") and "momentum" in k for k in off)


def _train_one_worker(rank: int, world: int, url: str, out: str) -> dict:
    from tf4ctr_dist.config import RunConfig
    from tf4ctr_dist.train.loop import WorkerContext, train_worker

    cfg = RunConfig().with_overrides([
        f"data.url={url}", f"out={out}", "cluster.workers=1", "train.batch_size=512", "train.epochs=1",
        "train.log_every=0", "easy_hidden_units=[32]", "hard_hidden_units=[32,16]", "embedding_dim=8",
        "sharding=table_wise", "embedding_optimizer=rowwise_adagrad", "embedding_lr=0.05",
    ])
    return train_worker(cfg, WorkerContext(rank=rank, world_size=world, device=torch.device("cpu")))


def test_the_worker_loop_uses_the_table_kernel_on_one_cpu_worker_and_says_so(tmp_path):
    from data_tools.synthetic import generate_synthetic

    url = str(tmp_path / "data")
    generate_synthetic(url, rows=12_000, fields=6, scale_vocab=0.05, seed=3, row_group_rows=2_000)
    result = spawn(_train_one_worker, 1, url, str(tmp_path / "run"), backend="gloo", threads=2, timeout=240)[0]
    plan = (tmp_path / "run" / "plan.txt").read_text()
    assert "table backward: tf4ctr row-wise Adagrad kernel on 2 intra-op threads" in plan
    assert "two threads" not in plan
    assert result["test"]["AUC"] > 0.6  # it trained (synthetic labels are learnable)
