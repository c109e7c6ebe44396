"""kkbox, avazu and ml-tag formats, and the BARS split rules, on tiny generated files."""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.bars_sets import AVAZU_RAW, prepare_avazu, prepare_kkbox, prepare_ml_tag
from data_tools.check import check_dataset
from data_tools.cli import main
from data_tools.splits import exact_sizes, folds_to_splits, stratified_folds
from tests.data_helpers import no_manifest_no_staging, write_csv
from tf4ctr_dist.data.errors import DataError

KKBOX_HEADER = ("label,msno,song_id,source_system_tab,source_screen_name,source_type,city,gender,registered_via,"
                "language,genre_ids,artist_name,isrc,bd")


def _kkbox_row(i: int, genres: str = "465|958", isrc: str = "TWA530887303", bd: str = "24") -> str:
    return f"{i % 2},u{i % 3},s{i % 4},tab,screen,type,{i % 2},female,7,3,{genres},A|B,{isrc},{bd}"


def _rows(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def _vocab(out: Path, m, name: str) -> list[str]:
    return pq.read_table(out / m.spec["vocab"][name]["file"]["path"]).column("token").to_pylist()


def test_age_bucket_and_country_rules() -> None:
    from data_tools.derive import bucketize_age, extract_country_code

    ages = pa.array(["0", "1", "10", "10.5", "20", "24", "60", "61", "95", "96", "", "x", "-3"])
    got = bucketize_age(ages, str, "bd").to_pylist()
    assert got == ["", "1", "1", "2", "2", "3", "6", "7", "7", "", "", "", ""]
    assert extract_country_code(pa.array(["TWA530887303", "", "G"]), str, "isrc").to_pylist() == ["TW", "", "G"]


def test_kkbox(tmp_path: Path) -> None:
    rows = [_kkbox_row(i) for i in range(12)]
    rows += [_kkbox_row(12, "1|2|3|4", "USXYZ", "61"), _kkbox_row(13, "", "", "0"), _kkbox_row(14, "465", "USAB", "61")]
    files = [write_csv(tmp_path / f"{s}.csv", KKBOX_HEADER, rows if s == "train" else rows[:3]) for s in ("train", "valid", "test")]
    out = tmp_path / "ds"
    m = prepare_kkbox(*files, str(out))
    assert check_dataset(str(out)).ok
    assert m.group == "msno" and len(m.fields) == 13
    assert {f.name: f.max_len for f in m.fields if f.kind == "sequence"} == {"genre_ids": 3, "artist_name": 3}
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 15, "valid": 3, "test": 3}
    # min count 2: isrc countries TW (12x) and US (2x); bd 24 -> "3" (12x), 61 -> "7" (2x), 0 -> missing
    assert _vocab(out, m, "isrc") == ["TW", "US"] and _vocab(out, m, "bd") == ["3", "7"]
    t = _rows(out, m, "train")
    assert t.column("isrc").to_pylist()[11:] == [1, 2, 3, 2]  # TW, US, missing -> OOV (3), US
    assert t.column("bd").to_pylist()[11:] == [1, 2, 3, 2]
    # genre ids: 465 (13x), 958 (12x); "1|2|3|4" keeps 1|2|3 (seen once: OOV, id 3)
    assert _vocab(out, m, "genre_ids") == ["465", "958"]
    assert t.column("genre_ids").to_pylist()[11:] == [[1, 2], [3, 3, 3], [], [1]]


def test_kkbox_missing_file(tmp_path: Path) -> None:
    files = [str(tmp_path / f"{s}.csv") for s in ("train", "valid", "test")]
    with pytest.raises(DataError, match=r"input file not found: .*train\.csv"):
        prepare_kkbox(*files, str(tmp_path / "ds"))
    assert no_manifest_no_staging(tmp_path / "ds")


AVAZU_HEADER = "id,click,hour," + ",".join(AVAZU_RAW)


def _avazu_row(i: int, hour: str) -> str:
    return f"{i},{int(i % 5 == 0)},{hour}," + ",".join(f"{c}{i % 3}" for c in AVAZU_RAW)


def test_avazu_hour_features_and_stratified_split(tmp_path: Path) -> None:
    hours = ["14102100", "14102523", "14102607", "14102913"]  # Tue 0h, Sat 23h, Sun 7h, Wed 13h
    rows = [_avazu_row(i, hours[i % 4]) for i in range(200)]
    path = write_csv(tmp_path / "train.csv", AVAZU_HEADER, rows)
    out = tmp_path / "ds"
    m = prepare_avazu([path], str(out), min_count=1)
    assert check_dataset(str(out)).ok
    assert [f.name for f in m.fields][:1] == ["hour"] and [f.name for f in m.fields][-2:] == ["weekday", "weekend"]
    assert len(m.fields) == 24
    # 10 stratified folds of 40 positives + 160 negatives: 20 rows, 4 positives each; 8:1:1
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 160, "valid": 20, "test": 20}
    for split in ("valid", "test"):
        assert sum(_rows(out, m, split).column(m.label).to_pylist()) == 4
    # hand-computed: weekday of 2014-10-21 is Tuesday (2), 25th Saturday (6), 26th Sunday (0), 29th Wednesday (3)
    assert [datetime.date(2014, 10, d).isoweekday() % 7 for d in (21, 25, 26, 29)] == [2, 6, 0, 3]
    assert _vocab(out, m, "hour") == ["0", "13", "23", "7"]
    assert _vocab(out, m, "weekday") == ["0", "2", "3", "6"] and _vocab(out, m, "weekend") == ["0", "1"]
    everything = pa.concat_tables([_rows(out, m, s) for s in ("train", "valid", "test")])
    expected = {"0": ("2", "0"), "23": ("6", "1"), "7": ("0", "1"), "13": ("3", "0")}
    hv, wv, ev = _vocab(out, m, "hour"), _vocab(out, m, "weekday"), _vocab(out, m, "weekend")
    for h, w, e in zip(*(everything.column(c).to_pylist() for c in ("hour", "weekday", "weekend"))):
        assert expected[hv[h - 1]] == (wv[w - 1], ev[e - 1])


def test_avazu_bad_hour(tmp_path: Path) -> None:
    rows = [_avazu_row(i, "14102100") for i in range(5)] + [_avazu_row(5, "1410210")]
    path = write_csv(tmp_path / "train.csv", AVAZU_HEADER, rows)
    with pytest.raises(DataError, match=r"train\.csv: line 7: column 'hour' = '1410210'; expected YYMMDDHH"):
        prepare_avazu([path], str(tmp_path / "ds"), min_count=1)
    assert no_manifest_no_staging(tmp_path / "ds")


def test_stratified_folds_sizes_and_balance() -> None:
    labels = np.array([1] * 37 + [0] * 263)
    fold = stratified_folds(labels, 10, 2018)
    sizes = np.bincount(fold, minlength=10)
    positives = np.bincount(fold, weights=labels, minlength=10)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 300
    assert positives.max() - positives.min() <= 1  # 37 positives: 3 or 4 per fold
    split = folds_to_splits(fold)
    assert np.bincount(split).tolist() == [int(sizes[:8].sum()), int(sizes[8]), int(sizes[9])]
    assert (stratified_folds(labels, 10, 2018) == fold).all() and not (stratified_folds(labels, 10, 1) == fold).all()


def test_ml_tag_one_file_7_2_1_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [f"{i % 2},u{i % 5},i{i % 7},t{i % 3}" for i in range(101)]
    path = write_csv(tmp_path / "all.csv", "label,user_id,item_id,tag_id", rows)
    out = tmp_path / "ds"
    assert main(["prepare", "ml-tag", "--input", path, "--out", str(out)]) == 0
    assert main(["check", str(out), "--quiet"]) == 0
    capsys.readouterr()
    from tf4ctr_dist.data.manifest import Manifest  # noqa: F401
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    rows_per_split = {s: v["rows"] for s, v in manifest["splits"].items()}
    # 101 rows 7:2:1: valid ceil(20.2) = 21, test ceil(10.1) = 11, train 69
    assert exact_sizes(101, (0.7, 0.2, 0.1)) == (69, 21, 11)
    assert rows_per_split == {"train": 69, "valid": 21, "test": 11}
    m = prepare_ml_tag([path], str(tmp_path / "ds2"))
    assert m.group == "user_id" and [f.name for f in m.fields] == ["user_id", "item_id", "tag_id"]


def test_wrong_separator_names_file(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", "label;user_id;item_id;tag_id", ["1;u;i;t", "0;u;i;t"])
    with pytest.raises(DataError, match=r"all\.csv: missing column\(s\).*separator ';'"):
        prepare_ml_tag([path], str(tmp_path / "ds"))
    assert no_manifest_no_staging(tmp_path / "ds")
