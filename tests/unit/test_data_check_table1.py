"""`tf4ctr check URL` prints the dataset's Table 1 row (rows per split, fields, vocabulary per
field, positive rate) on a tiny dataset with hand-counted figures."""

from __future__ import annotations

from pathlib import Path

from data_tools.bars_csv import prepare_bars_csv
from data_tools.check import check_dataset
from data_tools.cli import main as data_main
from tests.data_helpers import tiny_bars


def test_check_prints_table1_row(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    m = prepare_bars_csv(*tiny_bars(tmp_path), str(out), fields=["a", "b"], group_col="u", min_count=1)
    # tiny_bars labels: train 30 of 60 + "1,rare" = 31 of 62; valid 8 of 17 + 1 = 9 of 18; test 12 of 23
    report = check_dataset(str(out))
    assert report.ok and report.positives == {"train": 31, "valid": 9, "test": 12}
    vocab = {f.name: f.vocab_size for f in m.fields}
    # a: a0 a1 a2 rare (+ PAD, OOV) = 6; b: b0..b4 (+ PAD, OOV) = 7
    assert vocab == {"a": 6, "b": 7}
    assert data_main(["check", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "  rows: train 62 / valid 18 / test 23 (total 103)\n" in printed
    assert "  fields: 2 (gAUC group: u)\n" in printed
    assert "  vocabulary: a 6, b 7 (total 13)\n" in printed
    assert f"  positive rate: train {31 / 62:.4f}, valid {9 / 18:.4f}, test {12 / 23:.4f}, all {52 / 103:.4f}\n" in printed
