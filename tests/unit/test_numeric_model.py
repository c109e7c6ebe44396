"""Numeric fields embedded as value x vector in the dataset format, the reader and the model:
the weighted tables against a hand computation, the reader's weights, the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from data_tools.writer import DatasetWriter
from tests.data_helpers import read_split
from tf4ctr_dist.config import RunConfig
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import FieldSpec, Manifest
from tf4ctr_dist.data.tokens import lookup_weights
from tf4ctr_dist.model import tf4ctr
from tf4ctr_dist.modules.encoders import FIRST_ORDER_DIM
from tf4ctr_dist.modules.tf4ctr import _in_order
from tf4ctr_dist.serving.scorer import DenseProgram

FIELDS = [("c", 5), ("x", 1), ("h", 6)]
# 4 rows: c (row 2 has no id), x (row 1 missing), h (row 1 empty)
C = [1, 2, None, 4]
X = [0.5, None, -2.0, 3.0]
H = [[1, 2, 3], [], [5], [2, 4]]


def _kjt() -> KeyedJaggedTensor:
    """Built by hand from C, X, H: ids weigh 1, sequence ids 1/len, the numeric lookup (id 0) x."""
    c = [v for v in C if v is not None]
    x = [v for v in X if v is not None]
    h = [i for seq in H for i in seq]
    weights = [1.0] * len(c) + x + [1.0 / len(seq) for seq in H for _ in seq]
    lengths = [int(v is not None) for v in C] + [int(v is not None) for v in X] + [len(s) for s in H]
    return KeyedJaggedTensor(keys=["c", "x", "h"], values=torch.tensor(c + [0] * len(x) + h),
                             lengths=torch.tensor(lengths, dtype=torch.int32), weights=torch.tensor(weights))


def _model(*extra: str):
    cfg = RunConfig().with_overrides(["embedding_dim=4", "ssem=ser", "easy_hidden_units=[8]", "hard_hidden_units=[8]",
                                      "net_dropout=0", *extra])
    torch.manual_seed(0)
    model = tf4ctr(FIELDS, cfg.model, mean_pooled={"h"}, numeric={"x"}, cpu_kernels=None)
    with torch.no_grad():  # far from the 1e-4 init, so a lost or swapped block shows
        for name, p in model.named_parameters():
            if "embedding_bags" in name:
                p.uniform_(-1, 1)
    return model.eval()


def _by_hand(ebc, prefix: str) -> torch.Tensor:
    """(B, 3*dim): [E_c[c], x * v_x, mean of E_h over h], zeros where a row has nothing."""
    bags = ebc.embedding_bags
    e_c, v_x, e_h = bags[f"{prefix}_c"].weight, bags[f"{prefix}_x"].weight[0], bags[f"{prefix}_h"].weight
    dim = v_x.numel()
    rows = []
    for c, x, h in zip(C, X, H):
        rows.append(torch.cat([
            e_c[c] if c is not None else torch.zeros(dim),
            x * v_x if x is not None else torch.zeros(dim),
            e_h[h].mean(0) if h else torch.zeros(dim),
        ]))
    return torch.stack(rows)


def test_weighted_forward_equals_the_hand_computation():
    model = _model("model.encoders.first_order=easy")
    assert model.embedding.is_weighted() and model.hard_embedding.is_weighted() and model.linear_embedding.is_weighted()
    kjt = _kjt()
    with torch.no_grad():
        h_es = _in_order(model.embedding(kjt), model._easy_keys)  # (B, F*d/2)
        h_hs = _in_order(model.hard_embedding(kjt), model._hard_keys)  # (B, F*d)
        lin = _in_order(model.linear_embedding(kjt), model._linear_keys)  # (B, F*FIRST_ORDER_DIM)
        hand_es, hand_hs, hand_lin = _by_hand(model.embedding, "easy"), _by_hand(model.hard_embedding, "hard"), \
            _by_hand(model.linear_embedding, "lr")
        torch.testing.assert_close(h_es, hand_es, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(h_hs, hand_hs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lin, hand_lin, rtol=1e-6, atol=1e-7)
        assert lin.shape == (4, 3 * FIRST_ORDER_DIM)
        # the whole model on the table lookups = its dense part on the hand-computed blocks
        z = model(kjt)[0]
        expected = DenseProgram(model)(hand_es, hand_hs, hand_lin)
    torch.testing.assert_close(torch.sigmoid(z).view(-1), expected, rtol=1e-5, atol=1e-6)


def test_gradient_of_the_field_vector_is_the_value_weighted_upstream_sum():
    model = _model()
    kjt = _kjt()
    h = _in_order(model.hard_embedding(kjt), model._hard_keys)  # (B, 3*4)
    upstream = torch.randn_like(h, generator=torch.Generator().manual_seed(1))
    (h * upstream).sum().backward()
    bags = model.hard_embedding.embedding_bags
    d = 4
    grad_v = sum(x * upstream[b, d:2 * d] for b, x in enumerate(X) if x is not None)
    torch.testing.assert_close(bags["hard_x"].weight.grad[0], grad_v)
    # sequence ids get 1/len of their row's upstream gradient (MEAN pooling through weights)
    grad_h = torch.zeros(6, d)
    for b, seq in enumerate(H):
        for i in seq:
            grad_h[i] += upstream[b, 2 * d:] / len(seq)
    torch.testing.assert_close(bags["hard_h"].weight.grad, grad_h)


def test_datasets_without_numeric_fields_keep_the_unweighted_tables():
    cfg = RunConfig().with_overrides(["embedding_dim=4", "ssem=share"])
    plain = tf4ctr([("c", 5), ("h", 6)], cfg.model, mean_pooled={"h"}, cpu_kernels=None)
    assert not plain.embedding.is_weighted()
    pooling = {t.name: t.pooling for t in plain.embedding.embedding_bag_configs()}
    assert pooling == {"easy_c": PoolingType.SUM, "easy_h": PoolingType.MEAN}
    weighted = tf4ctr([("c", 5), ("h", 6), ("n", 1)], cfg.model, mean_pooled={"h"}, numeric={"n"}, cpu_kernels=None)
    assert weighted.embedding.is_weighted()
    assert {t.pooling for t in weighted.embedding.embedding_bag_configs()} == {PoolingType.SUM}
    # SUM with 1/len weights (lookup_weights) is the MEAN pooling of the unweighted tables
    weighted.load_state_dict({**weighted.state_dict(), **{k: v for k, v in plain.state_dict().items() if "embedding_bags" in k}})
    lengths = {"c": np.array([1, 1]), "h": np.array([3, 1]), "n": np.array([0, 0])}
    ids = KeyedJaggedTensor(keys=["c", "h"], values=torch.tensor([1, 2, 1, 2, 3, 5]), lengths=torch.tensor([1, 1, 3, 1]))
    w = np.concatenate([lookup_weights("categorical", lengths["c"]), lookup_weights("sequence", lengths["h"]),
                        lookup_weights("numeric", lengths["n"], np.array([np.nan, np.nan]))])
    with_weights = KeyedJaggedTensor(keys=["c", "h", "n"], values=ids.values(), lengths=torch.tensor([1, 1, 3, 1, 0, 0]),
                                     weights=torch.from_numpy(w))
    with torch.no_grad():
        got = weighted.embedding(with_weights).values()  # (2, 3*4)
        torch.testing.assert_close(got[:, :8], plain.embedding(ids).values())
        assert (got[:, 8:] == 0).all()


def test_numeric_table_row_zero_is_the_field_vector_not_pad():
    model = tf4ctr(FIELDS, RunConfig().with_overrides(["embedding_dim=4", "ssem=share"]).model, numeric={"x"},
                   cpu_kernels=None)
    assert model.embedding.embedding_bags["easy_x"].weight.shape == (1, 4)
    assert model.embedding.embedding_bags["easy_x"].weight.abs().min() > 0  # initialised, not zeroed
    assert (model.embedding.embedding_bags["easy_c"].weight[0] == 0).all()  # a PAD row stays zero


# ---- reader --------------------------------------------------------------------------------


def _write(tmp: Path, x: list, fields=None) -> tuple[str, Manifest]:
    fields = fields or [FieldSpec("cat", "categorical", 5), FieldSpec("x", "numeric", 1, vocab_mode="none"),
                        FieldSpec("seq", "sequence", 10, max_len=3)]
    url = str(tmp / "ds")
    with DatasetWriter(url, fields=fields, label="y", group=None, row_group_rows=3) as w:
        w.split("train").write(pa.table({
            "y": pa.array([1, 0, 1, 0], pa.float32()),
            "cat": pa.array([1, 0, 3, 4], pa.int64()),
            "x": pa.array(x, pa.float32()),
            "seq": pa.array([[1, 2, 3], [], [9], [4, 5]], pa.list_(pa.int64())),
            "_group": pa.array([0, 0, 0, 0], pa.int64()),
        }))
        m = w.commit({}, "test")
    return url, m


def test_reader_gives_weights_and_lengths_of_every_kind(tmp_path: Path):
    url, m = _write(tmp_path, [2.5, None, -0.25, 0.0])
    (batches,) = read_split(url, m, "train", world_size=1, batch_size=5)
    (b,) = batches
    d = b.sparse_features.to_dict()
    assert d["cat"].lengths().tolist() == [1, 0, 1, 1, 0] and d["cat"].values().tolist() == [1, 3, 4]
    assert d["cat"].weights().tolist() == [1.0, 1.0, 1.0]
    # a missing value has no lookup; 0.0 is a value (its lookup pools to the zero vector anyway)
    assert d["x"].lengths().tolist() == [1, 0, 1, 1, 0] and d["x"].values().tolist() == [0, 0, 0]
    assert d["x"].weights().tolist() == [2.5, -0.25, 0.0]
    assert d["seq"].lengths().tolist() == [3, 0, 1, 2, 0] and d["seq"].values().tolist() == [1, 2, 3, 9, 4, 5]
    np.testing.assert_allclose(d["seq"].weights().numpy(), [1 / 3] * 3 + [1.0, 0.5, 0.5], rtol=1e-7)
    assert b.valid.tolist() == [1, 1, 1, 1, 0]


def test_reader_without_numeric_fields_gives_no_weights(tmp_path: Path):
    fields = [FieldSpec("cat", "categorical", 5), FieldSpec("seq", "sequence", 10, max_len=3)]
    url = str(tmp_path / "ds")
    with DatasetWriter(url, fields=fields, label="y", group=None) as w:
        w.split("train").write(pa.table({"y": pa.array([1, 0], pa.float32()), "cat": pa.array([1, 2], pa.int64()),
                                         "seq": pa.array([[1], [2, 3]], pa.list_(pa.int64())),
                                         "_group": pa.array([0, 0], pa.int64())}))
        m = w.commit({}, "test")
    (batches,) = read_split(url, m, "train", world_size=1, batch_size=2)
    assert batches[0].sparse_features.weights_or_none() is None


def test_non_finite_stored_value_names_file_column_and_row_group(tmp_path: Path):
    url, m = _write(tmp_path, [1.0, 2.0, 3.0, float("nan")])
    with pytest.raises(DataError, match=r"train/part-00000\.parquet row group 1: column 'x' has the non-finite value nan"):
        read_split(url, m, "train", world_size=1, batch_size=2)


# ---- manifest --------------------------------------------------------------------------------


def test_manifest_numeric_fields_have_one_row_and_no_vocabulary(tmp_path: Path):
    _, m = _write(tmp_path, [1.0, 2.0, None, 4.0])
    again = Manifest.from_json(m.to_json())
    assert again.fields[1] == FieldSpec("x", "numeric", 1, None, "none") and again.numeric_fields == ["x"]
    assert again.arrow_schema().field("x").type == pa.float32() and again.arrow_schema().field("x").nullable
    raw = json.loads(m.to_json())
    raw["fields"][1]["vocab_size"] = 2
    with pytest.raises(DataError, match=r"fields\[1\] \(x\): a numeric field has one table row .* vocab_size should be 1"):
        Manifest.from_dict(raw)
    raw["fields"][1].update(vocab_size=1, vocab_mode="counted")
    with pytest.raises(DataError, match=r"vocab_mode of a numeric field should be 'none'"):
        Manifest.from_dict(raw)
