"""The table kernel (csrc/rowwise_adagrad.cpp) on the real sharded path: two gloo ranks, table-wise
TorchRec tables with the fused row-wise Adagrad, one step without and one with weight decay from
the same start. From the run without decay each touched row's gradient g follows
(w0 - w1 = m1 * g, h1 = h0 + mean(g^2)); the run with L2 decay must then give exactly
w2 = (1 - m2 * wd) * w0 - m2 * g with h2 = h0 + mean((g + wd * w0)^2), m = lr / (sqrt(h) + eps),
and leave every untouched row as it was. (fbgemm's own CPU kernel ignores the decay.)"""

from __future__ import annotations

import numpy as np
import torch

from tests.distributed.test_dense_tables import FIELDS, GLOBAL_BATCH, _global_batches, _make_batch, _model_cfg
from tf4ctr_dist.distributed.spawn import spawn

EMB_LR, DECAY, EPS = 0.05, 0.5, 1e-8


def _tables_and_momentum(dmp, optimizer) -> dict:
    """table name -> (weights (rows, D), momentum (rows,)) for the tables this rank holds."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def local(t):
        shards = t.local_shards() if isinstance(t, ShardedTensor) else []
        return shards[0].tensor.detach().numpy().copy() if shards else None

    out = {}
    opt_state = optimizer.state_dict()["state"]
    for key, value in dmp.state_dict().items():
        if "embedding_bags" not in key or (w := local(value)) is None:
            continue
        momentum = [local(t) for name, t in opt_state[f"sparse.{key}"].items() if "momentum1" in name]
        out[key] = (w, momentum[0].reshape(-1))
    return out


def _one_step(rank: int, world: int, data: dict) -> dict:
    from tf4ctr_dist.config import LossConfig
    from tf4ctr_dist.distributed.sharding import build_optimizer, resolve_placement, shard_model, uses_table_kernel
    from tf4ctr_dist.kernels import load
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr

    tables = embedding_tables(FIELDS, _model_cfg())
    placement = resolve_placement("table_wise", "rowwise_adagrad", "cpu")
    per_rank = GLOBAL_BATCH // world
    kernels = load("on")
    out = {"routed": uses_table_kernel(placement, torch.device("cpu"), kernels)}
    for decay in (0.0, DECAY):
        torch.manual_seed(7)
        module = TF4CTRTrain(tf4ctr(FIELDS, _model_cfg(), device="meta"), Objective(LossConfig()))
        dmp, _ = shard_model(module, tables, placement, device=torch.device("cpu"), embedding_lr=EMB_LR,
                             embedding_weight_decay=decay, local_batch_size=per_rank, table_kernel=kernels)
        opt = build_optimizer(dmp, lr=0.01, embedding_lr=EMB_LR, emb_reg=0.0, emb_reg_mode="touched",
                              clip_grad_norm=0.0)
        out[f"{decay}/init"] = _tables_and_momentum(dmp, opt)
        dmp.train()
        opt.zero_grad()
        loss, _ = dmp(_make_batch(data, rank * per_rank, (rank + 1) * per_rank))
        loss.backward()
        opt.step()
        out[f"{decay}/after"] = _tables_and_momentum(dmp, opt)
    return out


def test_sharded_tables_apply_l2_weight_decay_to_touched_rows():
    results = spawn(_one_step, 2, _global_batches(1, seed=9)[0], backend="gloo", threads=1, timeout=240)
    assert all(r["routed"] for r in results)
    merged: dict = {}
    for r in results:
        for k, v in r.items():
            if k != "routed":
                merged.setdefault(k, {}).update(v)
    init, plain, decayed = merged["0.0/init"], merged["0.0/after"], merged[f"{DECAY}/after"]
    assert len(plain) == 2 * len(FIELDS)  # easy and hard table of every field, over both ranks
    for key in init:
        np.testing.assert_array_equal(init[key][0], merged[f"{DECAY}/init"][key][0], err_msg=key)  # same start
    touched_total = 0
    for key, (w0, h0) in init.items():
        w0, h0 = w0.astype(np.float64), h0.astype(np.float64)
        (w1, h1), (w2, h2) = plain[key], decayed[key]
        touched = np.flatnonzero(h1 != h0)
        untouched = np.flatnonzero(h1 == h0)
        touched_total += len(touched)
        np.testing.assert_array_equal(w2[untouched], w0[untouched], err_msg=key)
        np.testing.assert_array_equal(h2[untouched], h0[untouched], err_msg=key)
        m1 = EMB_LR / (np.sqrt(h1[touched].astype(np.float64)) + EPS)
        g = (w0[touched] - w1[touched]) / m1[:, None]
        np.testing.assert_allclose((g * g).mean(axis=1), h1[touched] - h0[touched], rtol=1e-4, atol=1e-9)
        gd = g + DECAY * w0[touched]
        h2_want = h0[touched] + (gd * gd).mean(axis=1)
        m2 = EMB_LR / (np.sqrt(h2_want) + EPS)
        w2_want = (1 - m2 * DECAY)[:, None] * w0[touched] - m2[:, None] * g
        np.testing.assert_allclose(h2[touched], h2_want, rtol=1e-4, err_msg=key)
        np.testing.assert_allclose(w2[touched], w2_want, rtol=0, atol=2e-6, err_msg=key)
        assert not np.allclose(w2[touched], w1[touched], rtol=0, atol=1e-6), key  # the decay did something
    assert touched_total > 0
