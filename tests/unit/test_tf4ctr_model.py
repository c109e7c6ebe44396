"""The assembled TF4CTR model on real TorchRec EBCs (spec sections 1-4)."""

from __future__ import annotations

import pytest
import torch
import torchrec
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from tf4ctr_dist.modules import (
    TF4CTR,
    ConcatFusion,
    GateSSEM,
    MLPEncoder,
    MoEFusion,
    MoESSEM,
    ShareSSEM,
    SumFusion,
    VariationalFusion,
    WeightedSumFusion,
    field_tables,
)

# Frappe-like: 10 fields, vocabularies (PAD and OOV included) summing to 5,383 rows.
FRAPPE_FIELDS = list(
    zip(
        ["user", "item", "daytime", "weekday", "isweekend", "homework", "cost", "weather",
         "country", "city"],
        [958, 4000, 9, 9, 4, 5, 4, 11, 82, 301],
    )
)
SMALL_FIELDS = [("a", 6), ("b", 9), ("seq", 5)]


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build(fields, d, ssem, dfm, easy=(400, 400), hard=(400, 400, 400), dropout=0.2,
          device="cpu", mean_pooled=()):
    """Assemble a TF4CTR model from option names (test-only helper)."""
    dev = torch.device(device)
    n = len(fields)
    with dev:
        if ssem == "ser":
            emb = EmbeddingBagCollection(field_tables("easy", fields, d // 2, mean_pooled), device=dev)
            hard_emb = EmbeddingBagCollection(field_tables("hard", fields, d, mean_pooled), device=dev)
            module, s_in = None, n * d // 2
        else:
            emb = EmbeddingBagCollection(field_tables("emb", fields, d, mean_pooled), device=dev)
            hard_emb, s_in = None, n * d
            module = {"share": ShareSSEM, "gm": GateSSEM, "moe": MoESSEM}[ssem]
            module = module() if ssem == "share" else module(n * d, dropout)
        simple = MLPEncoder(s_in, easy, dropout)
        complex_ = MLPEncoder(n * d, hard, dropout)
        s, c = simple.out_dim, complex_.out_dim
        fusion = {
            "sum": lambda: SumFusion(),
            "wsf": lambda: WeightedSumFusion(),
            "vf": lambda: VariationalFusion(s, c),
            "cf": lambda: ConcatFusion(s, c),
            "moef": lambda: MoEFusion(s, c),
        }[dfm]()
        return TF4CTR(emb, hard_emb, module, simple, complex_, fusion)


def small_batch() -> KeyedJaggedTensor:
    # 3 samples; "seq" is multi-valued and empty for sample 1 (its PAD ids were removed).
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b", "seq"],
        values=torch.tensor([1, 5, 2, 3, 8, 8, 4, 1, 2, 4, 3]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 1, 3, 0, 2]),
    )


def test_frappe_ser_wsf_parameter_count():
    model = build(FRAPPE_FIELDS, 16, "ser", "wsf")
    rows = sum(v for _, v in FRAPPE_FIELDS)
    assert rows == 5383
    assert n_params(model.embedding) == rows * 8
    assert n_params(model.hard_embedding) == rows * 16
    assert n_params(model) == 711_996


def test_frappe_ser_wsf_parameter_count_on_meta():
    assert n_params(build(FRAPPE_FIELDS, 16, "ser", "wsf", device="meta")) == 711_996


def test_field_tables_and_embedding_init():
    tables = field_tables("hard", SMALL_FIELDS, 4)
    assert [t.name for t in tables] == ["hard_a", "hard_b", "hard_seq"]
    assert [t.feature_names for t in tables] == [["a"], ["b"], ["seq"]]
    assert [t.num_embeddings for t in tables] == [6, 9, 5]
    big = EmbeddingBagCollection(field_tables("x", [("f", 20000)], 16))
    w = big.embedding_bags["x_f"].weight
    assert torch.count_nonzero(w[0]) == 0  # PAD row
    assert w[1:].std().item() == pytest.approx(1e-4, rel=0.05)


def test_init_fn_leaves_row_zero_of_a_partial_shard():
    # A row-wise shard does not start at global row 0: its first row is a real token.
    (table,) = field_tables("x", [("f", 100)], 4)
    whole, shard = torch.empty(100, 4), torch.empty(40, 4)
    table.init_fn(whole)
    table.init_fn(shard)
    assert torch.count_nonzero(whole[0]) == 0
    assert torch.count_nonzero(shard[0]) == 4


def test_embedding_blocks_in_field_order_and_mean_pooled():
    d = 4
    model = build(SMALL_FIELDS, d, "share", "sum", easy=[8], hard=[8], mean_pooled={"seq"})
    kt = model.embedding(small_batch()).values()  # (B, F*d)
    assert kt.shape == (3, 3 * d)
    w = {f: model.embedding.embedding_bags[f"emb_{f}"].weight for f, _ in SMALL_FIELDS}
    torch.testing.assert_close(kt[0, 0:d], w["a"][1])
    torch.testing.assert_close(kt[2, d:2 * d], w["b"][8])
    torch.testing.assert_close(kt[0, 2 * d:], w["seq"][[4, 1, 2]].mean(0))
    torch.testing.assert_close(kt[2, 2 * d:], w["seq"][[4, 3]].mean(0))
    assert torch.count_nonzero(kt[1, 2 * d:]) == 0  # empty bag pools to zeros


def test_single_id_fields_sum_pooled_sequences_mean_pooled():
    tables = {t.name: t.pooling.name for t in field_tables("x", SMALL_FIELDS, 4, mean_pooled={"seq"})}
    assert tables == {"x_a": "SUM", "x_b": "SUM", "x_seq": "MEAN"}


@pytest.mark.parametrize("ssem", ["share", "ser", "gm", "moe"])
@pytest.mark.parametrize("dfm", ["sum", "wsf", "vf", "cf", "moef"])
def test_forward_backward_every_combination(ssem, dfm):
    torch.manual_seed(0)
    model = build(SMALL_FIELDS, 8, ssem, dfm, easy=[16], hard=[16, 8], dropout=0.1)
    z, z_s, z_c = model(small_batch())
    for t in (z, z_s, z_c):
        assert t.shape == (3, 1) and t.dtype == torch.float32
    (z.sum() + z_s.sum() + z_c.sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_ser_rejects_a_parametric_ssem():
    model = build(SMALL_FIELDS, 8, "ser", "sum", easy=[8], hard=[8])
    with pytest.raises(ValueError):
        TF4CTR(model.embedding, model.hard_embedding, GateSSEM(24, 0.0),
               model.simple_encoder, model.complex_encoder, SumFusion())


@pytest.mark.parametrize("ssem, dfm", [("ser", "wsf"), ("moe", "vf"), ("gm", "moef")])
def test_fx_symbolic_trace(ssem, dfm):
    model = build(SMALL_FIELDS, 8, ssem, dfm, easy=[16], hard=[16, 8]).eval()
    traced = torchrec.fx.symbolic_trace(model)
    kjt = small_batch()
    for got, want in zip(traced(kjt), model(kjt)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("ssem, dfm", [("ser", "wsf"), ("moe", "moef"), ("gm", "vf")])
def test_build_and_run_on_meta(ssem, dfm):
    model = build(SMALL_FIELDS, 8, ssem, dfm, easy=[16], hard=[16, 8], device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert n_params(model) == n_params(build(SMALL_FIELDS, 8, ssem, dfm, easy=[16], hard=[16, 8]))
    z, z_s, z_c = model(small_batch().to(torch.device("meta")))
    assert z.shape == z_s.shape == z_c.shape == (3, 1)


def test_reset_dense_parameters_after_materialising_from_meta():
    model = build(SMALL_FIELDS, 8, "gm", "wsf", easy=[16], hard=[16, 8], device="meta")
    model.to_empty(device="cpu")  # what DMP does for dense params: memory, no init
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    model.reset_dense_parameters()
    assert model.fusion.w_s.item() == 0.5 and model.fusion.w_c.item() == 0.5
    for m in model.modules():
        if isinstance(m, nn.Linear):
            assert torch.count_nonzero(m.bias) == 0 and (m.weight != 7.0).all()
        if isinstance(m, nn.BatchNorm1d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    # Tables are left alone.
    assert (model.embedding.embedding_bags["emb_a"].weight == 7.0).all()
