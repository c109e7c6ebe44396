"""Vocabulary building blocks: the stable hash, hashed ids, bounded-memory counting with spills,
field declarations, sequence cleaning, and the row counting behind byte-range shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from benchmarks.prepare import write_criteo_tsv
from data_tools.criteo import prepare_criteo
from data_tools import csv_input
from data_tools.csv_input import count_rows, open_text_input
from data_tools.fields import clean_lists, resolve_fields
from data_tools.options import OptionError
from data_tools import vocab as vocab_module
from data_tools.vocab import Vocabulary, VocabCounter, count_values, hash_ids, stable_hash, token_hash
from tf4ctr_dist.data.errors import DataError

REPO = Path(__file__).resolve().parents[2]


def test_stable_hash_pinned_values() -> None:
    # SipHash-2-4 of the UTF-8 bytes with pandas' fixed key: these values must never change,
    # or every hashed dataset already prepared would silently get different ids.
    got = stable_hash(pa.array(["", "a", "hello", "é"])).tolist()
    assert got == [1760245841805064774, 13950350942979735504, 16732354325915869343, 16908809132758853863]
    # nulls hash as "" (missing); integers as their decimal text; chunking and dictionaries do not matter
    assert stable_hash(pa.array([None, "x"])).tolist()[0] == got[0]
    assert stable_hash(pa.array([123])).tolist() == stable_hash(pa.array(["123"])).tolist()
    chunked = pa.chunked_array([["a", "hello"], ["é"]])
    assert stable_hash(chunked).tolist() == got[1:]
    assert stable_hash(pa.array(["hello", "a"]).dictionary_encode()).tolist() == [got[2], got[1]]


def test_hash_ids_range_and_same_across_processes() -> None:
    values = [f"v{i}" for i in range(5000)] + ["", "v7"]
    ids = hash_ids(pa.array(values), 97)
    assert ids.min() >= 1 and ids.max() <= 97 and ids[-1] == ids[7]
    assert len(set(ids.tolist())) == 97  # 5000 values fill every bucket
    code = (
        "import json, sys, pyarrow as pa; from data_tools.vocab import hash_ids; "
        "print(json.dumps(hash_ids(pa.array(json.loads(sys.argv[1])), 97).tolist()))"
    )
    for seed in ("0", "12345"):  # Python's own hash() would differ between these processes
        out = subprocess.run(
            [sys.executable, "-c", code, json.dumps(values[:300])], capture_output=True, text=True, check=True,
            cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert json.loads(out) == ids[:300].tolist()


def _partials(rng: np.random.Generator, batches: int) -> list[pa.Table]:
    out = []
    for _ in range(batches):
        a = pa.array([f"t{x}" for x in rng.zipf(1.3, 400) % 3000])
        b = pa.array([f"u{x}" for x in rng.integers(0, 50, 400)] + [""])
        out.append(pa.concat_tables([count_values(0, a), count_values(1, b)]))
    return out


def test_spilling_counter_equals_in_memory(tmp_path: Path) -> None:
    partials = _partials(np.random.default_rng(0), 40)
    with VocabCounter(2) as memory:
        for p in partials:
            memory.add(p)
        expected = memory.vocabularies([2, 1])
        assert memory.spills == 0
    spill_dir = tmp_path / "spill"
    with VocabCounter(2, memory_budget=4096, partitions=7, spill_dir=str(spill_dir)) as tiny:
        for p in partials:
            tiny.add(p)
        got = tiny.vocabularies([2, 1])
        assert tiny.spills > 5 and tiny.spilled_bytes > 0
        assert any(spill_dir.iterdir())
    assert not any(spill_dir.iterdir()), "spill files removed on close"
    assert [v.tokens for v in got] == [v.tokens for v in expected]
    assert [v.counts.tolist() for v in got] == [v.counts.tolist() for v in expected]
    assert "" not in expected[1].tokens and len(expected[1].tokens) == 50
    assert expected[0].tokens == sorted(expected[0].tokens)
    # counts are the exact totals over all partials
    truth: dict[str, int] = {}
    for p in partials:
        for f, t, c in zip(*(p.column(k).to_pylist() for k in ("field", "token", "count"))):
            if f == 0:
                truth[t] = truth.get(t, 0) + c
    assert dict(zip(got[0].tokens, got[0].counts.tolist())) == {t: c for t, c in truth.items() if c >= 2}


def test_criteo_with_tiny_counting_budget_is_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "c.tsv"
    write_criteo_tsv(raw, 3000, seed=1, chunk_rows=1000)
    spills: list[int] = []
    real_spill = VocabCounter._spill

    def counting_spill(self: VocabCounter, table: pa.Table) -> None:
        spills.append(table.num_rows)
        real_spill(self, table)

    monkeypatch.setattr(VocabCounter, "_spill", counting_spill)
    monkeypatch.setattr(csv_input, "BLOCK_SIZE", 32 << 10)  # ~25 chunks, so ~25 partial count tables
    a = prepare_criteo(str(raw), str(tmp_path / "a"), min_count=2, row_group_rows=500)
    assert spills == []
    b = prepare_criteo(str(raw), str(tmp_path / "b"), min_count=2, row_group_rows=500, vocab_memory_mb=0.01)
    assert len(spills) > 10, "the tiny budget must force spilling, or this test compares nothing"
    assert a == b
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.parquet"))
    assert len(files) == 39 + 3 and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def test_token_hash_is_layout_independent() -> None:
    values = ["", "a", "hello", "é", "x" * 300, "a"]
    h = token_hash(pa.array(values))
    assert h[1] == h[5] and len(set(h[:5].tolist())) == 5
    assert token_hash(pa.chunked_array([values[:2], values[2:]])).tolist() == h.tolist()
    assert token_hash(pa.array(["zz", *values]).slice(1)).tolist() == h.tolist()
    assert token_hash(pa.array(values, pa.large_string())).tolist() == h.tolist()
    assert token_hash(pa.array([None, "a"])).tolist() == [h[0], h[1]]  # null = missing = ""
    many = token_hash(pa.array([f"{i:08x}" for i in range(300_000)]))  # > one vectorised slice
    assert len(np.unique(many)) == len(many)


@pytest.mark.parametrize("collide", [False, True])
def test_vocabulary_lookup_is_exact(collide: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if collide:  # every token the same hash: lookups must still compare the tokens themselves
        monkeypatch.setattr(vocab_module, "token_hash", lambda s: np.full(len(s), 7, dtype=np.uint64))
    tokens = sorted(f"t{i}" for i in range(300))
    vocab = Vocabulary(tokens, np.arange(300) + 5)
    assert vocab.size == 302 and vocab.oov == 301
    query = pa.array(["t0", "t299", "nope", None, "", "t17", "t17", "T17", "t1"])
    expected = [1, tokens.index("t299") + 1, 301, 301, 301, tokens.index("t17") + 1, tokens.index("t17") + 1, 301, tokens.index("t1") + 1]
    assert vocab.lookup(query).tolist() == expected
    assert vocab.lookup(pa.array(tokens)).tolist() == list(range(1, 301))
    table = vocab.table()
    assert table.column("token").to_pylist() == tokens and table.column("id").to_pylist() == list(range(1, 301))
    assert table.column("count").to_pylist()[:2] == [5, 6]
    assert Vocabulary([]).lookup(query).tolist() == [1] * len(expected)  # empty: all OOV (= 1)


def test_clean_lists() -> None:
    lists = pa.array([["a", "", "b", "c", "d"], None, [], ["x", None]], pa.list_(pa.string()))
    assert clean_lists(lists, 3).to_pylist() == [["a", "b", "c"], [], [], ["x"]]
    assert clean_lists(lists, 2, keep="last").to_pylist() == [["c", "d"], [], [], ["x"]]
    ints = pa.array([[1, 2], [3]], pa.list_(pa.int64()))
    assert clean_lists(ints, 5).to_pylist() == [["1", "2"], ["3"]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab_mode="hashed"), "needs buckets"),
        (dict(field_options={"a": {"vocab_mode": "hashed", "min_count": 3}}, buckets=4), "min_count applies to vocab_mode counted"),
        (dict(field_options={"a": {"buckets": 3}}), "buckets applies to vocab_mode hashed"),
        (dict(field_options={"zz": {"vocab_mode": "hashed"}}), r"unknown field\(s\) \['zz'\]"),
        (dict(field_options={"a": {"colour": 1}}), r"unknown setting\(s\) \['colour'\]"),
        (dict(vocab_mode="bloom"), "vocab_mode should be one of"),
        (dict(field_options={"a": {"kind": "numeric"}}), "needs bucketing"),
        (dict(field_options={"a": {"kind": "sequence"}}), "max_len should be an integer"),
    ],
)
def test_field_declaration_errors(kwargs: dict, message: str) -> None:
    """Option mistakes (the CLI's exit status 2), raised before any row is read."""
    with pytest.raises(OptionError, match=message):
        resolve_fields(["a", "b"], **kwargs)


def test_field_defaults_and_overrides() -> None:
    plans = resolve_fields(
        ["a", {"name": "b", "vocab_mode": "hashed"}, {"name": "s", "kind": "sequence", "max_len": 4}],
        min_count=3, buckets=100, field_options={"a": {"vocab_mode": "hashed", "buckets": 7}},
    )
    assert [(p.name, p.vocab_mode, p.buckets, p.min_count) for p in plans] == [
        ("a", "hashed", 7, 1), ("b", "hashed", 100, 1), ("s", "counted", None, 3)
    ]
    assert plans[2].stored_kind == "sequence" and plans[2].max_len == 4


def test_count_rows_matches_pyarrow(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    body = "h1,h2\n1,a\n\n2,b\r\n3,c\n\r\n4,d\n5,e"  # blank lines, CRLF, no final newline
    path.write_bytes(body.encode())
    inp = open_text_input(str(path), delimiter=",")
    total = pacsv.read_csv(path).num_rows
    assert total == 5
    size = len(body)
    for cut in range(1, size):
        # counts over [0, cut) + [cut, size) always add up to the file's rows
        assert count_rows(inp, (0, cut)) + count_rows(inp, (cut, size)) in (total, total + 1)
    line_starts = [0] + [i + 1 for i, ch in enumerate(body) if ch == "\n"]
    per_line = [count_rows(inp, (a, b)) for a, b in zip(line_starts, line_starts[1:] + [size])]
    assert set(per_line) <= {0, 1} and sum(per_line) == total
    assert count_rows(inp, (0, size)) == total
