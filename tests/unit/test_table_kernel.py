"""The compiled table backward + exact row-wise Adagrad kernel (csrc/rowwise_adagrad.cpp), run
through real fbgemm table batches (SplitTableBatchedEmbeddingBagsCodegen on the CPU) with the
kernel routed in place of fbgemm's: against a float64 re-computation of the update (weight decay
modes, mean pooling, per-sample weights, repeated ids, a shared table, int32 ids, float16
weights, max_norm) and against fbgemm's own kernel where the two should agree."""

from __future__ import annotations

import copy

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
    WeightDecayMode,
)

from tf4ctr_dist.distributed.table_kernel import route_table_backward
from tf4ctr_dist.kernels import load


@pytest.fixture(scope="module")
def kernels():
    return load("on")  # a failed build must fail these tests (KernelUnavailable says why)


@pytest.fixture()
def routed(kernels):
    """The kernel routed in for the test, fbgemm's own kernel afterwards."""
    before = route_table_backward(kernels, True)
    yield
    route_table_backward(kernels, before)


def table_batch(specs, feature_table_map=None, **kw):
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for rows, dim in specs],
        feature_table_map=feature_table_map, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.3, eps=1e-3, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        tbe.weights_host.copy_((torch.rand(tbe.weights_host.shape, generator=g) - 0.5).to(tbe.weights_host.dtype))
        tbe.momentum1_host.copy_(torch.rand(tbe.momentum1_host.shape, generator=g))
    return tbe


def reference_step(tbe, feature_dims, feature_table, indices, offsets, grad, per_sample=None, mean=False,
                   weight_decay=0.0, mode=0, max_norm=0.0, lr=0.3, eps=1e-3):
    """float64 weights and momentum after one backward of `tbe` (per table: (rows, D) and (rows,))."""
    tables = {}
    for t in sorted(set(feature_table)):
        w, h = tbe.split_embedding_weights()[t], tbe.split_optimizer_states()[t][0]
        tables[t] = [w.double().clone(), h.double().clone(), {}]
    F = len(feature_dims)
    B = (len(offsets) - 1) // F
    col = [sum(feature_dims[:f]) for f in range(F)]
    for f in range(F):
        t = feature_table[f]
        for b in range(B):
            p0, p1 = int(offsets[f * B + b]), int(offsets[f * B + b + 1])
            for p in range(p0, p1):
                s = 1.0 / (p1 - p0) if mean else 1.0
                if per_sample is not None:
                    s *= float(per_sample[p])
                row = int(indices[p])
                g = grad[b, col[f]:col[f] + feature_dims[f]].double() * s
                acc = tables[t][2]
                acc[row] = acc[row] + g if row in acc else g
    for t, (w, h, acc) in tables.items():
        for row, g in acc.items():
            gd = g + weight_decay * w[row] if mode == 1 else g
            h[row] += (gd * gd).mean()
            m = lr / (h[row].sqrt() + eps)
            c = 1 - m * weight_decay if mode == 1 else (1 - lr * weight_decay if mode == 2 else 1.0)
            w[row] = c * w[row] - m * g
            if max_norm > 0 and w[row].norm() > max_norm:
                w[row] *= max_norm / w[row].norm()
    return {t: (w, h) for t, (w, h, _) in tables.items()}


def run_step(tbe, indices, offsets, grad, per_sample=None):
    out = tbe(indices, offsets, per_sample_weights=per_sample)
    out.backward(grad)


def assert_matches(tbe, ref, atol):
    for t, (w, h) in ref.items():
        torch.testing.assert_close(tbe.split_optimizer_states()[t][0].double(), h, atol=atol, rtol=1e-6)
        torch.testing.assert_close(tbe.split_embedding_weights()[t].double(), w, atol=atol, rtol=0)


def ids_and_offsets(F, B, rows, dtype=torch.int64, max_len=3, seed=0):
    """Bags of 0..max_len ids (some empty), with repeats inside and across bags."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, max_len + 1, (F * B,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    indices = torch.cat([torch.randint(0, rows[f], (int(lengths[f * B:(f + 1) * B].sum()),), generator=g)
                         for f in range(F)])
    return indices.to(dtype), offsets.to(dtype)


@pytest.mark.parametrize("mode,decay", [(0, 0.0), (1, 0.05), (2, 0.05)])
@pytest.mark.parametrize("mean", [False, True])
def test_update_matches_float64(routed, mode, decay, mean):
    specs = [(7, 4), (5, 8)]
    F, B = 2, 6
    kw = dict(weight_decay=decay, weight_decay_mode=WeightDecayMode(mode) if mode else WeightDecayMode.NONE,
              pooling_mode=PoolingMode.MEAN if mean else PoolingMode.SUM)
    tbe = table_batch(specs, **kw)
    indices, offsets = ids_and_offsets(F, B, [7, 5])
    grad = torch.randn(B, 12, generator=torch.Generator().manual_seed(1))
    ref = reference_step(tbe, [4, 8], [0, 1], indices, offsets, grad, mean=mean, weight_decay=decay, mode=mode)
    run_step(tbe, indices, offsets, grad)
    assert_matches(tbe, ref, atol=2e-6)


def test_per_sample_weights_shared_table_and_int32_ids(routed):
    # features 0 and 2 look up the same table: their gradients meet in one row update
    specs = [(6, 4), (9, 4)]
    feature_table = [0, 1, 0]
    tbe = table_batch(specs, feature_table_map=feature_table, weight_decay=0.01,
                      weight_decay_mode=WeightDecayMode.L2)
    indices, offsets = ids_and_offsets(3, 5, [6, 9, 6], dtype=torch.int32)
    per_sample = torch.rand(len(indices), generator=torch.Generator().manual_seed(2)) + 0.5
    grad = torch.randn(5, 12, generator=torch.Generator().manual_seed(4))
    ref = reference_step(tbe, [4, 4, 4], feature_table, indices, offsets, grad, per_sample=per_sample,
                         weight_decay=0.01, mode=1)
    run_step(tbe, indices, offsets, grad, per_sample)
    assert_matches(tbe, ref, atol=2e-6)


def test_max_norm_caps_updated_rows(routed):
    tbe = table_batch([(8, 4)], max_norm=0.2)
    indices, offsets = ids_and_offsets(1, 6, [8])
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    ref = reference_step(tbe, [4], [0], indices, offsets, grad, max_norm=0.2)
    touched = sorted(set(indices.tolist()))
    run_step(tbe, indices, offsets, grad)
    assert_matches(tbe, ref, atol=2e-6)
    assert tbe.split_embedding_weights()[0][touched].norm(dim=1).max() <= 0.2 + 1e-6


def test_table_above_the_dense_slot_map_limit(routed):
    """Tables over 4M rows number their rows with a hash map instead of the dense map."""
    rows = (1 << 22) + 1
    tbe = table_batch([(rows, 4), (9, 4)], weight_decay=0.01, weight_decay_mode=WeightDecayMode.L2)
    indices = torch.tensor([rows - 1, 5, rows - 1, 0, 3, 3])  # repeats in the big table, then table 1
    offsets = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    grad = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))
    ref = reference_step(tbe, [4, 4], [0, 1], indices, offsets, grad, weight_decay=0.01, mode=1)
    run_step(tbe, indices, offsets, grad)
    for t, (w, h) in ref.items():
        touched = sorted({int(i) for i in indices[:3]}) if t == 0 else [0, 3]
        torch.testing.assert_close(tbe.split_embedding_weights()[t][touched].double(), w[touched], atol=2e-6, rtol=0)
        torch.testing.assert_close(tbe.split_optimizer_states()[t][0][touched].double(), h[touched], atol=2e-6,
                                   rtol=1e-6)


def test_float16_weights(routed):
    tbe = table_batch([(10, 8)], weights_precision=SparseType.FP16, weight_decay=0.02,
                      weight_decay_mode=WeightDecayMode.DECOUPLE)
    indices, offsets = ids_and_offsets(1, 7, [10])
    grad = torch.randn(7, 8, generator=torch.Generator().manual_seed(6))
    ref = reference_step(tbe, [8], [0], indices, offsets, grad, weight_decay=0.02, mode=2)
    run_step(tbe, indices, offsets, grad)
    assert_matches(tbe, ref, atol=2e-3)  # float16 rounding of the stored rows


def test_agrees_with_fbgemm_and_routing_switches_back(kernels):
    """Without weight decay (which fbgemm's CPU kernel drops) the two kernels give the same update
    up to float32 rounding; routing off gives fbgemm's own result again, bit for bit."""
    base = table_batch([(300, 16)] * 3)
    F, B = 3, 256
    indices, offsets = ids_and_offsets(F, B, [300] * 3, max_len=1)
    grad = torch.randn(B, 48, generator=torch.Generator().manual_seed(7))
    fbgemm_run, ours, fbgemm_again = (copy.deepcopy(base) for _ in range(3))

    before = route_table_backward(kernels, False)
    try:
        run_step(fbgemm_run, indices, offsets, grad)
        assert route_table_backward(kernels, True) is False
        run_step(ours, indices, offsets, grad)
        assert route_table_backward(None, False) is True  # routing out needs no handle
        run_step(fbgemm_again, indices, offsets, grad)
    finally:
        route_table_backward(kernels, before)

    assert not torch.equal(ours.weights_host, base.weights_host)  # it did update
    torch.testing.assert_close(ours.weights_host, fbgemm_run.weights_host, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.momentum1_host, fbgemm_run.momentum1_host, atol=0, rtol=1e-5)
    assert torch.equal(fbgemm_again.weights_host, fbgemm_run.weights_host)


def test_fbgemm_cpu_kernel_drops_weight_decay(kernels):
    """Why the kernel matters beyond speed: fbgemm 1.8's CPU kernel ignores weight decay (if this
    starts failing, fbgemm fixed it and the docs' note, shard_model's warning and the refusal in
    placement.check_table_weight_decay can go)."""
    indices, offsets = ids_and_offsets(1, 8, [6])
    grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(8))
    results = []
    before = route_table_backward(kernels, False)
    try:
        for routed_in in (False, True):
            route_table_backward(kernels, routed_in)
            pair = []
            for decay in (0.0, 0.5):
                mode = WeightDecayMode.L2 if decay else WeightDecayMode.NONE
                tbe = table_batch([(6, 4)], weight_decay=decay, weight_decay_mode=mode)
                run_step(tbe, indices, offsets, grad)
                pair.append(tbe.weights_host.clone())
            results.append(torch.equal(pair[0], pair[1]))
    finally:
        route_table_backward(kernels, before)
    assert results == [True, False]  # fbgemm: decay changes nothing; this kernel: it does


def test_out_of_range_id_names_the_table(routed):
    tbe = table_batch([(4, 4), (5, 4)])
    indices = torch.tensor([0, 1, 2, 7])  # 7 is past table 1's 5 rows
    offsets = torch.tensor([0, 1, 2, 3, 4])
    args = dict(grad_output=torch.ones(2, 8), host_weights=tbe.weights_host,
                weights_placements=tbe.weights_placements, weights_offsets=tbe.weights_offsets,
                D_offsets=tbe.D_offsets, max_D=4, hash_size_cumsum=tbe.hash_size_cumsum, total_hash_size_bits=4,
                indices=indices, offsets=offsets, pooling_mode=0, indice_weights=torch.empty(0),
                stochastic_rounding=False, momentum1_host=tbe.momentum1_host,
                momentum1_placements=tbe.momentum1_placements, momentum1_offsets=tbe.momentum1_offsets,
                learning_rate_tensor=torch.tensor(0.1), eps=1e-8)
    before = (tbe.weights_host.clone(), tbe.momentum1_host.clone())
    with pytest.raises(RuntimeError, match=r"table 1 \(features 1\): index 7 at position 3 is outside \[0, 5\)"):
        torch.ops.tf4ctr.rowwise_adagrad_backward(**args)
    # ids are checked before any row changes: table 0's good ids did not update it either
    assert torch.equal(tbe.weights_host, before[0]) and torch.equal(tbe.momentum1_host, before[1])


def test_routing_in_needs_the_loaded_kernels():
    with pytest.raises(ValueError, match="the CPU kernels are not loaded"):
        route_table_backward(None, True)



@pytest.mark.parametrize("optimizer,given", [("rowwise_adagrad", False), ("adagrad", True), ("sgd", True)])
def test_shard_model_warns_where_fbgemm_drops_the_decay(monkeypatch, tmp_path, optimizer, given, kernels):
    """fbgemm's CPU kernels leave weight decay out (row-wise Adagrad without this package's
    kernel, Adagrad, SGD): the configured decay would silently do nothing, so say so (training
    runs refuse such configs earlier: test_kernel_setting.py)."""
    import torch.distributed as dist

    from tf4ctr_dist.config import LossConfig, ModelConfig
    from tf4ctr_dist.distributed import sharding
    from tf4ctr_dist.distributed.sharding import resolve_placement, shard_model
    from tf4ctr_dist.model import Objective, TF4CTRTrain, embedding_tables, tf4ctr

    warnings: list[str] = []  # recorded at the call: other tests may change logging's levels
    monkeypatch.setattr(sharding.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    fields = [("a", 11), ("b", 7)]
    cfg = ModelConfig(embedding_dim=8, easy_hidden_units=[8], hard_hidden_units=[8])
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        for decay, warned in ((0.0, False), (1e-5, True)):
            warnings.clear()
            module = TF4CTRTrain(tf4ctr(fields, cfg, device="meta"), Objective(LossConfig()))
            shard_model(module, embedding_tables(fields, cfg), resolve_placement("table_wise", optimizer, "cpu"),
                        device=torch.device("cpu"), embedding_lr=0.05, embedding_weight_decay=decay,
                        local_batch_size=4, table_kernel=kernels if given else None)
            assert any(f"weight decay 1e-05 will not be applied: fbgemm's CPU {optimizer} kernel" in w
                       for w in warnings) is warned
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", [EmbOptimType.EXACT_ADAGRAD, EmbOptimType.EXACT_SGD])
def test_fbgemm_cpu_adagrad_and_sgd_drop_weight_decay_too(kind):
    """The ground for shard_model's warning on those optimizers (fails once fbgemm applies it)."""
    indices, offsets = ids_and_offsets(1, 8, [6])
    grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(10))
    after = []
    for decay in (0.0, 0.5):
        mode = WeightDecayMode.L2 if decay else WeightDecayMode.NONE
        tbe = SplitTableBatchedEmbeddingBagsCodegen([(6, 4, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                    optimizer=kind, learning_rate=0.3, eps=1e-3,
                                                    weight_decay=decay, weight_decay_mode=mode)
        with torch.no_grad():
            tbe.weights_host.copy_(torch.linspace(-1, 1, tbe.weights_host.numel()))
        run_step(tbe, indices, offsets, grad)
        after.append(tbe.weights_host.clone())
    assert not torch.equal(after[0], torch.linspace(-1, 1, after[0].numel()))  # it did update
    assert torch.equal(after[0], after[1])
