"""MovieLens-1M converter on a tiny hand-written fixture in the ML-1M layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.check import check_dataset
from data_tools.cli import main
from data_tools.criteo import split_of_row_numbers
from data_tools.movielens import LABEL_RULE, prepare_movielens
from data_tools.vocab import stable_hash
from tests.data_helpers import no_manifest_no_staging
from data_tools.options import OptionError
from data_tools.splits import exact_sizes, exact_split
from tf4ctr_dist.data.errors import DataError

USERS = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::15::55117",
    "4::M::45::7::02460",
    "5::F::25::20::98107-4507",
]
MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Jumanji (1995)::Adventure|Children's|Fantasy",
    "3::Grumpier Old Men (1995)::Comedy|Romance",
    "4::Cité des enfants perdus, La (1995)::Adventure|Sci-Fi",  # latin-1, a comma
    "5::Star Wars: Episode IV - A New Hope (1977)::Action|Adventure|Fantasy|Sci-Fi",  # ':' in a title, 4 genres
    "6::Heat (1995)::Action|Crime|Thriller",
]


def ratings(n: int = 240) -> list[str]:
    rng = np.random.default_rng(7)
    return [
        f"{rng.integers(1, 6)}::{rng.integers(1, 7)}::{rng.integers(1, 6)}::{978300760 + i}"
        for i in range(n)
    ]


def write_ml1m(folder: Path, rating_lines: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("users.dat", USERS), ("movies.dat", MOVIES), ("ratings.dat", rating_lines or ratings())):
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return folder


def _table(out: Path, m, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(out / p.path) for p in m.splits[split].parts])


def test_prepare_ml1m_as_published(tmp_path: Path) -> None:
    """Defaults = the authors' logs: every rating kept, rating >= 4 -> 1, five fields, min count
    2, exact 8:1:1 sizes (valid/test rounded up)."""
    lines = ratings(243)
    folder = write_ml1m(tmp_path / "ml-1m", lines)
    out = tmp_path / "ds"
    m = prepare_movielens(str(folder), str(out), row_group_rows=32)
    assert [(f.name, f.kind) for f in m.fields] == [
        ("UserID", "categorical"), ("Gender", "categorical"), ("Age", "categorical"),
        ("Occupation", "categorical"), ("MovieID", "categorical"),
    ]
    assert m.group == "UserID" and m.spec["label_rule"] == LABEL_RULE == "rating >= 4 -> 1; else 0"
    assert m.spec["min_count"] == 2
    assert check_dataset(str(out)).ok
    # 243 ratings: valid = test = ceil(24.3) = 25, train 193 (1,000,209 -> 800,167 / 100,021 / 100,021)
    assert exact_sizes(1_000_209, (0.8, 0.1, 0.1)) == (800_167, 100_021, 100_021)
    assert {s: i.rows for s, i in m.splits.items()} == {"train": 193, "valid": 25, "test": 25}

    parsed = [tuple(int(x) for x in line.split("::")[:3]) for line in lines]
    split = exact_split(len(parsed), 2018, (0.8, 0.1, 0.1))
    for j, name in enumerate(("train", "valid", "test")):
        rows = [p for p, s in zip(parsed, split) if s == j]
        t = _table(out, m, name)
        assert t.column("label").to_pylist() == [1.0 if r >= 4 else 0.0 for _, _, r in rows]
        groups = stable_hash(pa.array([str(u) for u, _, _ in rows])).view(np.int64)
        assert (t.column("_group").to_numpy() == groups).all()
    # min count 2 on train: a user seen once in train maps to OOV
    train_users = [u for (u, _, _), s in zip(parsed, split) if s == 0]
    vocab = {f.name: f for f in m.fields}
    assert vocab["UserID"].vocab_size == len({u for u in train_users if train_users.count(u) >= 2}) + 2


def test_ml1m_options_drop_neutral_genres_threshold(tmp_path: Path) -> None:
    lines = ratings()
    folder = write_ml1m(tmp_path / "ml-1m", lines)
    out = tmp_path / "ds"
    m = prepare_movielens(
        str(folder), str(out), row_group_rows=32, drop_neutral=True, genres=True, split_rule="hash",
        label_threshold=5, min_count=1,
    )
    assert [f.name for f in m.fields][-1] == "Genres" and m.fields[-1].kind == "sequence"
    assert m.spec["label_rule"] == "rating >= 5 -> 1; else 0; rating 3 dropped"
    assert check_dataset(str(out)).ok

    parsed = [tuple(int(x) for x in line.split("::")[:3]) for line in lines]
    kept = [(i, u, mv, r) for i, (u, mv, r) in enumerate(parsed) if r != 3]
    split = split_of_row_numbers(np.array([k[0] for k in kept], dtype=np.uint64), 2018, (0.8, 0.1, 0.1))
    assert {s: i.rows for s, i in m.splits.items()} == {name: int((split == j).sum()) for j, name in enumerate(("train", "valid", "test"))}
    for j, name in enumerate(("train", "valid", "test")):
        rows = [k for k, s in zip(kept, split) if s == j]
        t = _table(out, m, name)
        assert t.column("label").to_pylist() == [1.0 if r >= 5 else 0.0 for _, _, _, r in rows]

    train = _table(out, m, "train")
    vocab = {f.name: f for f in m.fields}
    assert vocab["Gender"].vocab_size == 4  # F, M + PAD + OOV
    # Genres: sorted train vocabulary; a movie's first 3 genres in file order
    genres = sorted({g for line in MOVIES for g in line.rsplit("::", 1)[1].split("|")})
    assert vocab["Genres"].vocab_size == len(genres) + 2 and vocab["Genres"].max_len == 3
    train_rows = [k for k, s in zip(kept, split) if s == 0]
    star_wars = [g for (_, _, mv, _), g in zip(train_rows, train.column("Genres").to_pylist()) if mv == 5]
    assert star_wars and all(g == [genres.index(x) + 1 for x in ("Action", "Adventure", "Fantasy")] for g in star_wars)


@pytest.mark.parametrize(
    "key, message",
    [("label_threshold", "label_threshold should be an integer rating in 2..5"),
     ("split_rule", "split_rule should be one of"), ("drop_neutral", "drop_neutral should be true or false")],
)
def test_ml1m_bad_options(tmp_path: Path, key: str, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        prepare_movielens(str(tmp_path), str(tmp_path / "ds"), **{key: "x"})


def test_hashed_fields_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    out = tmp_path / "ds"
    argv = ["prepare", "movielens", "--input", str(folder), "--out", str(out),
            "--set", "field_options={UserID: {vocab_mode: hashed, buckets: 50}, MovieID: {vocab_mode: hashed, buckets: 50}}"]
    assert main(argv) == 0
    assert main(["check", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(argv[:-2] + ["genres=true", "--set", "field_options={Genres: {kind: categorical}}"]) == 2  # an option mistake
    assert "Genres' is a sequence field" in capsys.readouterr().err


@pytest.mark.parametrize(
    "line, message",
    [
        ("9::1::5::978300760", "line 3: UserID 9 is not in users.dat"),
        ("1::77::5::978300760", "line 3: MovieID 77 is not in movies.dat"),
        ("1::1::6::978300760", r"line 3: column 'Rating' = 6; expected 1\.\.5"),
        ("1::1::x::978300760", "line 3: column 'Rating' = 'x'; expected an integer"),
        ("1::1::5", r"line 3: 3 '::'-separated fields, expected 4"),
    ],
)
def test_bad_ratings(tmp_path: Path, line: str, message: str) -> None:
    folder = write_ml1m(tmp_path / "ml-1m", ["1::1::5::978300760", "2::2::1::978300761", line])
    with pytest.raises(DataError, match=message) as info:
        prepare_movielens(str(folder), str(tmp_path / "ds"))
    assert "ratings.dat" in str(info.value)
    assert no_manifest_no_staging(tmp_path / "ds")


def test_missing_file(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    (folder / "users.dat").unlink()
    with pytest.raises(DataError, match=r"users\.dat: not found"):
        prepare_movielens(str(folder), str(tmp_path / "ds"))
