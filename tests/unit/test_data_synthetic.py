"""Synthetic generator: deterministic, Criteo-shaped, labels that depend on the ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.synthetic import default_field_names, default_vocab_sizes, generate_synthetic
from tests.data_helpers import no_manifest_no_staging
from tf4ctr_dist.data.errors import DataError


def _train(out: Path, m) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits["train"].parts])


def test_deterministic_for_seed_and_chunking(tmp_path: Path) -> None:
    kwargs = dict(rows=3000, fields=6, vocab_sizes=[10, 50, 200, 5, 1000, 30], row_group_rows=256)
    a = generate_synthetic(str(tmp_path / "a"), seed=7, **kwargs)
    b = generate_synthetic(str(tmp_path / "b"), seed=7, **kwargs)
    c = generate_synthetic(str(tmp_path / "c"), seed=8, **kwargs)
    sha = lambda m: [p.sha256 for s in m.splits.values() for p in s.parts]  # noqa: E731
    assert sha(a) == sha(b) and sha(a) != sha(c)
    assert {s: i.rows for s, i in a.splits.items()} == {"train": 2400, "valid": 300, "test": 300}
    # Packing row groups into files differently does not change the data.
    d = generate_synthetic(str(tmp_path / "d"), seed=7, row_groups_per_part=2, **kwargs)
    assert _train(tmp_path / "d", d).equals(_train(tmp_path / "a", a))


def test_criteo_shape_and_ranges(tmp_path: Path) -> None:
    m = generate_synthetic(str(tmp_path / "ds"), rows=2000, scale_vocab=0.01, seed=1, row_group_rows=500)
    names = [f.name for f in m.fields]
    assert names == default_field_names(39) and names[:2] == ["I1", "I2"] and names[-1] == "C26"
    assert [f.vocab_size for f in m.fields] == default_vocab_sizes(39, 0.01)
    assert sum(default_vocab_sizes(39)) > 900_000  # about 1M embedding rows at full scale
    t = _train(tmp_path / "ds", m)
    for f in m.fields:
        ids = t.column(f.name).to_numpy()
        assert ids.min() >= 1 and ids.max() < f.vocab_size
    assert (t.column("_group").to_numpy() == 0).all() and m.group is None
    assert m.spec["format"] == "synthetic" and 0.7 < m.spec["teacher"]["bayes_auc"] < 0.95


def test_labels_depend_on_ids(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    m = generate_synthetic(str(out), rows=40_000, fields=8, vocab_sizes=[40] * 8, seed=4, row_group_rows=8192)
    t = _train(out, m)
    y = t.column("label").to_numpy()
    base = y.mean()
    assert 0.2 < base < 0.3
    gaps = []
    for f in m.fields:
        ids = t.column(f.name).to_numpy()
        counts = np.bincount(ids, minlength=f.vocab_size)
        top = counts.argmax()
        assert counts[top] > 3 * len(ids) / (f.vocab_size - 1)  # Zipf-like: a hot id
        gaps.append(abs(y[ids == top].mean() - base))
    # Sampling noise on a hot id (thousands of rows) is ~0.01; the teacher moves rates far more.
    assert max(gaps) > 0.08


def test_bad_arguments_leave_nothing(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with pytest.raises(DataError, match="vocab_sizes has 2 entries"):
        generate_synthetic(str(out), rows=10, fields=3, vocab_sizes=[5, 5])
    with pytest.raises(DataError, match="split"):
        generate_synthetic(str(out), rows=10, split=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="rows"):
        generate_synthetic(str(out), rows=0)
    assert no_manifest_no_staging(out)
