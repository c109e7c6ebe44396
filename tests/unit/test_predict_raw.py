"""`predict` on raw input: headerless TSV in Criteo's layout (the column order recorded at
prepare time, or --columns), bad rows named by file and line, several files numbered on; and
the shares --workers spreads, cut at the batches one process would use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.serving_data import fresh_artifact, prepare
from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.serving import load
from tf4ctr_dist.serving.predict import predict


def _criteo_lines(n: int, seed: int = 0) -> list[str]:
    """Criteo release rows: label, I1..I13 (ints, some missing), C1..C26 (hex, some missing)."""
    rng = np.random.default_rng(seed)
    pool = [f"{x:08x}" for x in rng.integers(0, 1 << 32, 12)]
    lines = []
    for i in range(n):
        ints = ["" if rng.random() < 0.1 else str(int(rng.integers(0, 500))) for _ in range(13)]
        cats = ["" if rng.random() < 0.05 else pool[int(rng.integers(0, len(pool)))] for _ in range(26)]
        label = int(rng.random() < 0.3 + 0.4 * (cats[0] == pool[0]))
        lines.append("\t".join([str(label), *ints, *cats]))
    return lines


@pytest.fixture(scope="module")
def criteo(tmp_path_factory):
    from data_tools.criteo import COLUMNS, prepare_criteo

    folder = tmp_path_factory.mktemp("criteo-raw")
    day = folder / "day_0"
    day.write_text("\n".join(_criteo_lines(600)) + "\n")
    manifest = prepare_criteo(str(day), str(folder / "dataset"), min_count=2, row_group_rows=64)
    assert manifest.spec["raw_columns"] == COLUMNS  # recorded at prepare time
    _, path = fresh_artifact(str(folder / "dataset"), str(folder / "m.tf4ctr"))
    return folder, path, COLUMNS


def test_headerless_tsv_in_criteo_layout_scores_like_the_same_rows_with_a_header(criteo, tmp_path):
    folder, path, columns = criteo
    scorer = load(path)
    assert scorer.raw_columns == columns  # read back from the artifact's spec
    rows = _criteo_lines(300, seed=1)
    bare, headed = tmp_path / "bare.tsv", tmp_path / "headed.tsv"
    bare.write_text("\n".join(rows) + "\n")
    headed.write_text("\t".join(columns) + "\n" + "\n".join(rows) + "\n")
    a = pq.read_table(predict(scorer, str(bare), str(tmp_path / "a.parquet"), batch_size=128)["out"])
    b = pq.read_table(predict(scorer, str(headed), str(tmp_path / "b.parquet"), batch_size=128)["out"])
    assert a.num_rows == 300 and a.column_names == ["row", "label", "score"]
    assert a.equals(b)  # same rows, labels and scores, bit for bit
    assert np.ptp(a.column("score").to_numpy()) > 1e-4  # not a constant: the features reached the model
    # and the scores are those of the rows themselves (the column order was applied, not shifted)
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(headed, parse_options=pacsv.ParseOptions(delimiter="\t"),
                           convert_options=pacsv.ConvertOptions(column_types={c: "string" for c in columns}))
    np.testing.assert_array_equal(a.column("score").to_numpy(), scorer.score(table, 128).astype(np.float32))
    # --columns gives the same order explicitly
    c = pq.read_table(predict(scorer, str(bare), str(tmp_path / "c.parquet"), batch_size=128, columns=columns)["out"])
    assert c.equals(a)


def test_headerless_errors_name_the_file_and_line(criteo, tmp_path):
    folder, path, columns = criteo
    scorer = load(path)
    rows = _criteo_lines(50, seed=2)
    rows[6] = rows[6].rsplit("\t", 1)[0]  # line 7 lost its last column
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"bad\.tsv: line 7: 39 columns, expected 40 \(label\.\.C26\)"):
        predict(scorer, str(bad), str(tmp_path / "out.parquet"))
    assert not list(tmp_path.glob("out.parquet*"))  # nothing written, nothing left over
    # the first line already has the wrong count: refused before scoring
    short = tmp_path / "short.tsv"
    short.write_text("1\t2\t3\n")
    with pytest.raises(DataError, match=r"short\.tsv: line 1 has 3 columns; expected 40"):
        predict(scorer, str(short), str(tmp_path / "out.parquet"))
    # no recorded order and no --columns: say what to do
    scorer.info.pop("raw_columns")
    with pytest.raises(DataError, match="names none of the model's fields.*--columns"):
        predict(scorer, str(tmp_path / "short.tsv"), str(tmp_path / "out.parquet"))
    with pytest.raises(DataError, match=r"lack\(s\) the model's field\(s\) \['C26'\]"):
        predict(scorer, str(short), str(tmp_path / "out.parquet"), columns=columns[:-1])


def test_bars_csv_without_header_and_several_files(tmp_path):
    url, (_, _, test_csv) = prepare(tmp_path / "bars")
    _, path = fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    scorer = load(path)
    assert scorer.raw_columns == ["label", "a", "b", "u"]
    lines = Path(test_csv).read_text().splitlines()
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    first.write_text("\n".join(lines[1:401]) + "\n")  # no header: the recorded order
    second.write_text("\n".join([lines[0], *lines[401:]]) + "\n")  # a header
    whole = pq.read_table(predict(scorer, test_csv, str(tmp_path / "whole.parquet"), batch_size=100)["out"])
    both = pq.read_table(predict(scorer, [str(first), str(second)], str(tmp_path / "both.parquet"),
                                 batch_size=100)["out"])
    # rows numbered on across the files; batches restart at each file, and 400 is a multiple of
    # the batch size, so even the batches (and with them every bit of the scores) are the same
    assert both.equals(whole)
    np.testing.assert_array_equal(both.column("row").to_numpy(), np.arange(1000))
    with pytest.raises(DataError, match="--columns is for files without one"):
        predict(scorer, str(second), str(tmp_path / "x.parquet"), columns=["label", "a", "b", "u"])
    with pytest.raises(DataError, match="--keep applies to raw input"):
        predict(scorer, url, str(tmp_path / "x.parquet"), keep=["id"])


def test_shares_cut_at_the_batches_of_one_process(tmp_path):
    """What --workers N rests on: the shares of a prepared split and of a Parquet file, scored
    one by one, give exactly the batches (and tables) of the whole input scored at once."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from tf4ctr_dist.serving.predict import numbered, plan, score_share

    url, (_, _, test_csv) = prepare(tmp_path / "bars")
    _, path = fresh_artifact(url, str(tmp_path / "m.tf4ctr"))
    scorer = load(path)
    parquet = tmp_path / "test.parquet"
    raw = pacsv.read_csv(test_csv, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in "label a b u".split()}))
    pq.write_table(raw, parquet, row_group_size=150)

    def tables(data: list[str], pieces: int) -> list[pa.Table]:
        shares = plan(scorer, data, "test", 96, pieces=pieces)
        assert len(shares) == pieces
        return list(numbered((s, score_share(scorer, s, 96)) for s in shares))

    for data in ([url], [str(parquet)]):
        whole = tables(data, 1)
        assert [t.num_rows for t in whole] == [96] * 10 + [40]
        for pieces in (2, 3, 11):
            parts = tables(data, pieces)
            assert [t.num_rows for t in parts] == [t.num_rows for t in whole], (data, pieces)
            assert all(a.equals(b) for a, b in zip(parts, whole)), (data, pieces)
