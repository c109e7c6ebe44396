"""Serving without a trained run: raw values map to the ids `prepare` wrote, the artifact
container round-trips, requests are checked, and the dense program exports with torch.export."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from tests.serving_data import fresh_artifact as _fresh_artifact, prepare
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import load_manifest
from tf4ctr_dist.serving import artifact, load
from tf4ctr_dist.serving.export import read_vocabularies
from tf4ctr_dist.serving.features import build_mappers


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("serving"))


def _raw(path: str) -> pa.Table:
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "label a b u".split()}))


def test_raw_values_map_to_the_prepared_ids(dataset):
    url, (_, _, test_csv) = dataset
    manifest = load_manifest(url)
    mappers = build_mappers([vars(f) for f in manifest.fields], manifest.spec, read_vocabularies(url, manifest))
    raw = _raw(test_csv)
    prepared = pq.read_table(f"{url}/{manifest.splits['test'].parts[0].path}")
    assert prepared.num_rows == raw.num_rows
    for m in mappers:
        values, lengths = m.ids(raw.column(m.name))
        assert (lengths == 1).all()
        np.testing.assert_array_equal(values, prepared.column(m.name).to_numpy(), err_msg=m.name)
    # the test split has OOV (missing a) and hashed-missing ids: the rules, not just the vocabulary
    a = next(m for m in mappers if m.name == "a")
    assert (a.ids(pa.array(["", None, "never-seen"]))[0] == a.oov).all()
    u = next(m for m in mappers if m.name == "u")
    assert u.ids(pa.array([None]))[0][0] == u.ids(pa.array([""]))[0][0]
    assert u.ids(pa.array([123]))[0][0] == u.ids(pa.array(["123"]))[0][0]


def test_artifact_loads_the_same_model_and_scores_raw_rows(dataset, tmp_path):
    url, (_, _, test_csv) = dataset
    model, path = _fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    scorer = load(path)
    assert not scorer.training
    raw = _raw(test_csv)
    # the loaded module = the model that was written, on the prepared ids
    kjt = scorer.features(raw)
    with torch.no_grad():
        expected = torch.sigmoid(model(kjt)[0]).view(-1)
    got = scorer.score(raw)
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-7)
    assert got.std() > 1e-3  # not a constant
    # dict of columns, list of row objects and pandas give the same scores (a smaller batch may
    # round differently in the last bit: GEMM blocking depends on the batch)
    rows = raw.slice(0, 7).to_pylist()
    for same in (rows, raw.slice(0, 7).to_pandas(), {k: raw.column(k).to_pylist()[:7] for k in "abu"}):
        np.testing.assert_allclose(scorer.score(same), got[:7], rtol=0, atol=1e-6)
    with pytest.raises(DataError, match=r"missing feature column\(s\) \['u'\]"):
        scorer.score({"a": ["a1"], "b": ["b1"]})


def test_artifact_is_plain_safetensors_layout(dataset, tmp_path):
    url, _ = dataset
    _, path = _fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"]["format"] == "tf4ctr-serving"
    assert "vocab.a.bytes" in header and "vocab.u.bytes" not in header  # hashed: no vocabulary
    assert header["model.embedding.embedding_bags.easy_a.weight"]["shape"] == [32, 4]
    assert b"\x80\x04" not in raw[: 8 + n]  # no pickle in the header
    tensors, meta = artifact.read(path)
    assert json.loads(meta["fields"])[2]["vocab_mode"] == "hashed"
    # truncated files are refused with a message, not a crash
    (tmp_path / "cut.tf4ctr").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(DataError, match="outside the file"):
        artifact.read(str(tmp_path / "cut.tf4ctr"))
    (tmp_path / "junk.tf4ctr").write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match="not a tf4ctr serving artifact"):
        load(str(tmp_path / "junk.tf4ctr"))


def test_dense_program_exports_with_torch_export(dataset, tmp_path):
    url, (_, _, test_csv) = dataset
    _, path = _fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    scorer = load(path)
    raw = _raw(test_csv)
    pooled = scorer.pooled(scorer.features(raw.slice(0, 64)))
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(scorer.dense, pooled, dynamic_shapes=tuple({0: batch} for _ in pooled))
    # portable ops only: the fused inference op of the CPU path is not traced into the program
    assert not any("mkldnn" in str(n.target) for n in program.graph.nodes)
    more = scorer.pooled(scorer.features(raw.slice(64, 300)))
    np.testing.assert_allclose(program.module()(*more).detach().numpy(), scorer.score(raw.slice(64, 300)),
                               rtol=0, atol=1e-6)


def test_requests_are_checked(dataset):
    from tf4ctr_dist.serving.deploy import parse_request

    names = ["a", "b", "u"]
    assert parse_request(b'{"rows": [{"a": "a1", "b": "b2", "u": 3}]}', names) == [{"a": "a1", "b": "b2", "u": 3}]
    for body, message in [(b"not json", "not JSON"), (b"[1, 2]", "expected a JSON object"),
                          (b'{"rows": 5}', "should be a list"), (b'{"rows": [1]}', "is not an object"),
                          (b'{"rows": [{"a": "x"}]}', r"lack field\(s\) \['b', 'u'\]"),
                          (b'{"columns": [1]}', "should be an object")]:
        with pytest.raises(DataError, match=message):
            parse_request(body, names)


def test_precision_override_scores_in_bf16(dataset, tmp_path, caplog):
    from tf4ctr_dist.modules.mlp import cpu_has_fast_bf16

    url, (_, _, test_csv) = dataset
    _, path = _fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    raw = _raw(test_csv).slice(0, 300)
    fp32 = load(path).score(raw)
    caplog.clear()
    with caplog.at_level("WARNING", logger="tf4ctr_dist"):
        low = load(path, "bf16")
    # on a CPU without bf16 dot products the user is told that bf16 is the slow choice here
    assert any("bf16" in r.getMessage() for r in caplog.records) == (not cpu_has_fast_bf16())
    assert low.model.complex_encoder.inference_dtype == torch.bfloat16
    gap = np.abs(low.score(raw) - fp32).max()
    assert 1e-7 < gap < 5e-3  # it ran in bf16, and bf16 is close
    np.testing.assert_array_equal(load(path, "fp32").score(raw), fp32)  # fp32 = this run's default
