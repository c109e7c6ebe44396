"""Hostile serving input: a tampered artifact, a request body of the wrong shape. Each is a DataError naming the file (or the row and
field) and what was expected, raised before any large allocation; none is a traceback from
json, numpy, torch or Arrow, and none a 500 from the serve endpoint."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.serving_data import fresh_artifact, prepare
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.serving import artifact, load


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("hostile"), rows=(600, 100, 100))


@pytest.fixture(scope="module")
def good(dataset, tmp_path_factory):
    """A sound artifact (counted fields a, b; hashed field u) and its bytes."""
    url, _ = dataset
    _, path = fresh_artifact(url, str(tmp_path_factory.mktemp("good") / "m.tf4ctr"))
    return path, Path(path).read_bytes()


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header_text: bytes, data: bytes) -> bytes:
    header_text += b" " * (-(8 + len(header_text)) % 8)
    return struct.pack("<Q", len(header_text)) + header_text + data


def _tampered(raw: bytes, edit) -> bytes:
    """The artifact with its header JSON edited by ``edit(header)``, the data unchanged."""
    header, data = _split(raw)
    edit(header)
    return _join(json.dumps(header).encode(), data)


def _meta(key: str, value) -> callable:
    return lambda h: h["__metadata__"].__setitem__(key, value)


def _entry(name: str, **changes) -> callable:
    return lambda h: h[name].update(changes)


def _fields(change) -> callable:
    def edit(h):
        fields = json.loads(h["__metadata__"]["fields"])
        change({f["name"]: f for f in fields})
        h["__metadata__"]["fields"] = json.dumps(fields)
    return edit


def _first_offset(name: str) -> callable:  # a tensor of 3 bytes where 8 belong: the audit's "misaligned"
    return lambda h: h[name].update(shape=[], data_offsets=[0, 3])


def _negative(name: str) -> callable:  # a shape of two negative dims whose product fits the bytes
    return lambda h: h[name].update(shape=[-2, -3], data_offsets=[h[name]["data_offsets"][0],
                                                                  h[name]["data_offsets"][0] + 48])


def _embedding_dim(h):
    cfg = json.loads(h["__metadata__"]["config"])
    cfg["model"]["embedding_dim"] = 16
    h["__metadata__"]["config"] = json.dumps(cfg)


# (how the artifact is tampered with, what the message says after the path)
HEADER_EDITS = [
    ("no_config", lambda h: h["__metadata__"].pop("config"), "metadata lacks 'config' (expected the run's configuration"),
    ("bad_config_json", _meta("config", "{not json"), "metadata 'config' is not JSON"),
    ("config_not_object", _meta("config", "[1, 2]"), "metadata 'config' is a JSON list; expected the run's configuration"),
    ("config_unknown_key", _meta("config", '{"zzz": 1}'), "metadata 'config': unknown config key"),
    ("deep_fields", _meta("fields", "[" * 100_000 + "]" * 100_000), "metadata 'fields' nests arrays or objects too deep"),
    ("no_source", lambda h: h["__metadata__"].pop("source"), "metadata lacks 'source'"),
    ("misaligned", _first_offset("vocab.a.offsets"), "data_offsets [0, 3] hold 3 bytes, expected 8 for I64 []"),
    ("neg_shape", _negative("vocab.a.offsets"), "shape [-2, -3], expected a list of non-negative integers"),
    ("unknown_dtype", _entry("vocab.a.offsets", dtype="X9"), "dtype 'X9', expected one of"),
    ("wrong_dtype", _entry("vocab.a.offsets", dtype="U8"), "hold 248 bytes, expected 31 for U8 [31]"),
    ("entry_not_object", lambda h: h.__setitem__("vocab.a.offsets", [1]), "expected an object {dtype, shape, data_offsets}"),
    ("metadata_not_text", _meta("format", 1), "__metadata__ should be an object of strings"),
    ("overlap", lambda h: h["vocab.a.offsets"].update(data_offsets=[0, 248]), "starts at data byte 0, expected"),
    ("shape_beyond_its_bytes", _entry("model.embedding.embedding_bags.easy_a.weight", shape=[10**12, 4]),
     "hold 512 bytes, expected 16000000000000 for F32 [1000000000000, 4]"),
    ("extra_tensor", lambda h: h.__setitem__("vocab.zz.bytes", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}),
     "the header holds 1 tensor(s) its config and fields do not imply, e.g. ['vocab.zz.bytes']"),
    # the metadata and the header disagree: refused from the header's shapes, before any table exists
    ("huge_hashed_vocab", _fields(lambda f: f["u"].update(vocab_size=10**10)),
     "tensor 'model.embedding.embedding_bags.easy_u.weight' is F32 [65, 4] in the header, but the artifact's config "
     "and fields imply F32 [10000000000, 4]"),
    ("huge_counted_vocab", _fields(lambda f: f["a"].update(vocab_size=10**10)),
     "tensor 'vocab.a.offsets' is I64 [31] in the header, but the artifact's config and fields imply I64 [9999999999]"),
    ("hashed_made_counted", _fields(lambda f: f["u"].update(vocab_mode="counted")),
     "the header lacks 2 tensor(s) its config and fields imply, e.g. ['vocab.u.bytes', 'vocab.u.offsets']"),
    ("config_embedding_dim", _embedding_dim,
     "tensor 'model.embedding.embedding_bags.easy_a.weight' is F32 [32, 4] in the header, but the artifact's config "
     "and fields imply F32 [32, 8]"),
]


def _shapes(path: str) -> dict:
    header, _ = _split(Path(path).read_bytes())
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def test_the_fixture_layout(good):
    """The edits above assume these shapes (a: 30 tokens, u: 64 buckets, embedding_dim 8: the
    easy tables take half of it)."""
    path, _ = good
    shapes = _shapes(path)
    assert shapes["vocab.a.offsets"] == [31]
    assert shapes["model.embedding.embedding_bags.easy_u.weight"] == [65, 4]
    assert shapes["model.embedding.embedding_bags.easy_a.weight"] == [32, 4]


@pytest.mark.parametrize("name, edit, message", HEADER_EDITS, ids=[e[0] for e in HEADER_EDITS])
def test_tampered_artifact_is_refused_by_name(good, tmp_path, monkeypatch, name, edit, message):
    from tf4ctr_dist.serving import export

    _, raw = good
    path = str(tmp_path / f"{name}.tf4ctr")
    Path(path).write_bytes(_tampered(raw, edit))

    def no_model(*args, **kwargs):  # the refusal comes first: no table is ever allocated
        raise AssertionError("build_model called on a tampered artifact")

    monkeypatch.setattr(export, "build_model", no_model)
    with pytest.raises(DataError, match=re.escape(path) + ": .*" + re.escape(message)):
        load(path)


def test_deep_or_oversized_header_is_refused(good, tmp_path, monkeypatch):
    _, raw = good
    _, data = _split(raw)
    deep = tmp_path / "deep.tf4ctr"
    deep.write_bytes(_join(b"[" * 200_000 + b"]" * 200_000, data))
    with pytest.raises(DataError, match=re.escape(str(deep)) + r": .*nests arrays or objects too deep"):
        load(str(deep))
    # a header length within the file but over the cap is refused before it is read
    monkeypatch.setattr(artifact, "MAX_HEADER_BYTES", 64)
    with pytest.raises(DataError, match=r"header length \d+ bytes, expected at most 64"):
        artifact.read_header(str(deep))


def test_trailing_bytes_and_truncation_are_refused(good, tmp_path):
    _, raw = good
    (tmp_path / "long.tf4ctr").write_bytes(raw + b"\0" * 8)
    with pytest.raises(DataError, match="8 bytes after the last tensor, expected the file to end there"):
        artifact.read_header(str(tmp_path / "long.tf4ctr"))
    (tmp_path / "cut.tf4ctr").write_bytes(raw[:-8])
    with pytest.raises(DataError, match=r"lies outside the file .*truncated\?"):
        artifact.read_header(str(tmp_path / "cut.tf4ctr"))


def _with_data(raw: bytes, name: str, content: bytes) -> bytes:
    """The artifact with tensor ``name``'s bytes replaced (same length), the header unchanged."""
    header, data = _split(raw)
    begin, end = header[name]["data_offsets"]
    assert len(content) == end - begin
    start = len(raw) - len(data)
    return raw[: start + begin] + content + raw[start + end :]


def test_vocabulary_offsets_that_do_not_cut_the_bytes(good, tmp_path):
    """Offsets within the header's rules (right dtype and length) but not a cut of the bytes."""
    _, raw = good
    tensors, _ = artifact.read(good[0])
    offsets = tensors["vocab.a.offsets"].numpy()
    path = tmp_path / "offsets.tf4ctr"
    for bad in (offsets[::-1], offsets + 1):
        path.write_bytes(_with_data(raw, "vocab.a.offsets", bad.astype("<i8").tobytes()))
        with pytest.raises(DataError, match=re.escape(f"{path}: vocab.a.offsets should rise, never falling, from 0")):
            load(str(path))
    path.write_bytes(_with_data(raw, "vocab.a.bytes", b"\xff" * len(tensors["vocab.a.bytes"])))
    with pytest.raises(DataError, match=re.escape(f"{path}: vocab.a.bytes is not UTF-8 text")):
        load(str(path))


def test_cli_predict_names_the_tampered_artifact(good, dataset, tmp_path, capsys):
    from tf4ctr_dist.cli import main

    url, _ = dataset
    _, raw = good
    path = tmp_path / "no_config.tf4ctr"
    path.write_bytes(_tampered(raw, lambda h: h["__metadata__"].pop("config")))
    assert main(["predict", "--model", str(path), "--data", url, "--out", str(tmp_path / "out.parquet")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tf4ctr predict: error: {path}: artifact metadata lacks 'config' (expected the run's "
                   "configuration, an object, as `tf4ctr export` writes it)"]


def test_predict_on_workers_refuses_a_tampered_artifact_before_starting_ray(good, dataset, tmp_path, monkeypatch):
    import tf4ctr_dist.train.launch as launch
    from tf4ctr_dist.cli import main

    url, _ = dataset
    _, raw = good
    path = tmp_path / "no_config.tf4ctr"
    path.write_bytes(_tampered(raw, lambda h: h["__metadata__"].pop("config")))
    monkeypatch.setattr(launch, "init_ray", lambda *a, **k: pytest.fail("Ray started for a bad artifact"))
    assert main(["predict", "--model", str(path), "--data", url, "--out", str(tmp_path / "out.parquet"),
                 "--workers", "2", "--batch-size", "64"]) == 1


def test_serve_refuses_a_tampered_artifact_before_starting_ray(good, tmp_path, monkeypatch):
    import ray

    from tf4ctr_dist.serving.deploy import start

    _, raw = good
    path = tmp_path / "neg_shape.tf4ctr"
    path.write_bytes(_tampered(raw, _negative("vocab.a.offsets")))

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a tampered artifact")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(DataError, match=re.escape(f"{path}: header entry 'vocab.a.offsets': shape [-2, -3]")):
        start(str(path))


def test_sound_artifact_still_loads(good):
    path, _ = good
    scorer = load(path)
    assert scorer.score({"a": ["a1"], "b": ["b2"], "u": ["u3"]}).shape == (1,)


# ---- the serve endpoint's request parsing ------------------------------------------------------

NAMES = ["a", "b", "u"]


def test_deep_request_body_is_a_400():
    from tf4ctr_dist.serving.deploy import RequestTooLarge, parse_request

    with pytest.raises(DataError, match="nests arrays or objects too deep") as e:
        parse_request(b"[" * 200_000 + b"]" * 200_000, NAMES)
    assert not isinstance(e.value, RequestTooLarge)


def test_body_over_the_cap_is_refused_before_parsing(monkeypatch):
    from tf4ctr_dist.serving import deploy

    assert deploy.MAX_BODY_BYTES >= deploy.MAX_ROWS * 1024  # generous: a JSON row is well under 1 KiB
    monkeypatch.setattr(deploy, "MAX_BODY_BYTES", 100)

    def no_parse(*args, **kwargs):
        raise AssertionError("parsed a body over the cap")

    monkeypatch.setattr(deploy.json, "loads", no_parse)
    with pytest.raises(deploy.RequestTooLarge, match="request body of 101 bytes; at most 100"):
        deploy.parse_request(b" " * 101, NAMES)


def test_too_many_rows_is_a_413_error(monkeypatch):
    from tf4ctr_dist.serving import deploy

    monkeypatch.setattr(deploy, "MAX_ROWS", 2)
    row = {"a": "a1", "b": "b1", "u": "u1"}
    assert deploy.parse_request(json.dumps({"rows": [row] * 2}).encode(), NAMES) == [row] * 2
    for body in ({"rows": [row] * 3}, {"columns": {k: [v] * 3 for k, v in row.items()}}):
        with pytest.raises(deploy.RequestTooLarge, match="3 rows in one request; at most 2"):
            deploy.parse_request(json.dumps(body).encode(), NAMES)


@pytest.mark.parametrize("body, message", [
    ({"rows": [{"a": "a1", "b": "b1", "u": {"x": 1}}]}, r"row 0, field 'u': an object \{'x': 1\}; expected one value"),
    ({"rows": [{"a": "a1", "b": "b1", "u": "u1"}, {"a": [1, 2], "b": "b1", "u": "u1"}]},
     r"row 1, field 'a': a list \[1, 2\]; expected one value \(text or a number\)"),
    # mixed with ordinary values: once stringified as a token, now refused too
    ({"rows": [{"a": "a1", "b": "b1", "u": 3}, {"a": "a1", "b": {"x": 1}, "u": 3}]}, r"row 1, field 'b': an object"),
    ({"columns": {"a": ["a1", "a2"], "b": ["b1", [["x"]]], "u": ["u1", "u2"]}}, r"row 1, field 'b': a list \[\['x'\]\]"),
    ({"columns": {"a": ["a1"], "b": ["b1"], "u": [{"k": {"k": {"k": {"k": 1}}}}]}}, r"row 0, field 'u': an object"),
], ids=["object", "list", "mixed_object", "columns_nested_list", "columns_deep_object"])
def test_values_that_are_not_one_value_are_a_400(good, body, message):
    from tf4ctr_dist.serving.deploy import parse_request

    path, _ = good
    scorer = load(path)
    rows = parse_request(json.dumps(body).encode(), scorer.feature_names)
    with pytest.raises(DataError, match=message):
        scorer.features(rows)


def test_sequence_fields_take_lists_of_values_only():
    from tf4ctr_dist.serving.features import to_table

    table = to_table([{"s": ["x", 3]}, {"s": ["y"]}, {"s": None}], ["s"], lists={"s"})
    assert table.column("s").to_pylist() == [["x", "3"], ["y"], None]
    assert to_table({"s": [["x"], []]}, ["s"], lists={"s"}).column("s").to_pylist() == [["x"], []]
    for rows, message in [([{"s": ["x"]}, {"s": [{"k": 1}]}], r"row 1, field 's': a list \[\{'k': 1\}\]; expected a list of values"),
                          ([{"s": [["x"]]}], r"row 0, field 's': a list \[\['x'\]\]; expected one value \(text or a "
                                             r"number\) or a list of such values"),
                          ([{"s": {"k": 1}}], r"row 0, field 's': an object"),
                          ([{"s": "x|y"}, {"s": ["x"]}], r"row 1, field 's': a list \['x'\]; expected the same form")]:
        with pytest.raises(DataError, match=message):
            to_table(rows, ["s"], lists={"s"})


def test_a_secret_in_the_source_metadata_goes_no_further(good, tmp_path):
    """`source` is informational (serve and predict show it); a URL with user-info put there by
    hand loses the secret when loaded."""
    _, raw = good

    def edit(h):
        source = json.loads(h["__metadata__"]["source"])
        source["data"] = "s3://AKIAFAKEKEY:SeCrEt/xyz@bucket/ds"
        h["__metadata__"]["source"] = json.dumps(source)

    path = tmp_path / "source_secret.tf4ctr"
    path.write_bytes(_tampered(raw, edit))
    info = load(str(path)).info
    assert info["source"]["data"] == "s3://bucket/ds"
    assert "SeCrEt" not in json.dumps(info)
