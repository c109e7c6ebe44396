"""MovieLens-1M raw files -> prepared Parquet dataset.

Input: a folder (local path or URL) holding the ML-1M release files, "::"-separated, latin-1:
  ratings.dat  UserID::MovieID::Rating::Timestamp
  users.dat    UserID::Gender::Age::Occupation::Zip-code
  movies.dat   MovieID::Title::Genres            (Genres "|"-separated, e.g. Animation|Comedy)

Defaults follow the TF4CTR authors' logs (SPEC section 7): the paper's five fields UserID,
Gender, Age, Occupation, MovieID (categorical, raw codes as tokens), every rating kept (1,000,209),
label rating >= 4 -> 1 else 0, min count 2. Options (data_tools.options.MovieLensOptions):
label_threshold; drop_neutral (drop the rating-3 rows, AutoInt's rule, about 26%); genres (a sixth
field, Genres: the movie's genres in file order, a sequence of at most max_len 3). Zip-code, Title
and Timestamp are not used.
Split (split_rule exact, default): a seeded permutation of the kept ratings with exact sizes,
valid and test ceil(n * fraction) (data_tools.splits.exact_split): 1,000,209 ratings at 8:1:1 ->
800,167 / 100,021 / 100,021 as in the logs. It counts the kept ratings once before reading.
split_rule hash: a seeded splitmix64 hash of the rating's 0-based line number in ratings.dat
(the Criteo rule; streaming, sizes only close to the fractions).
Group: UserID (the `_group` column; gAUC averages AUC per user).
Vocabularies: counted on train (min_count 2 by default) or hashed, per field (data_tools.fields).
ratings.dat is streamed in blocks; users.dat and movies.dat (6,040 and 3,883 lines) are joined
from memory. Every rating must name a known user and movie.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.manifest import Manifest
from tf4ctr_dist.data.storage import Location, display_url, resolve

from .criteo import check_split, split_of_row_numbers
from .engine import Engine
from .fields import clean_lists, resolve_fields, split_strings
from .options import MovieLensOptions
from .pipeline import Chunk, Source, prepare
from .progress import Progress
from .splits import exact_split
from .vocab import stable_hash

FILES = ("ratings.dat", "users.dat", "movies.dat")
FIELDS = ["UserID", "Gender", "Age", "Occupation", "MovieID"]
GENRES = "Genres"
FIXED: dict[str, dict[str, Any]] = {name: {"kind": "categorical"} for name in FIELDS}
FIXED[GENRES] = {"kind": "sequence", "max_len": 3, "splitter": "|"}
LABEL = "label"


def label_rule(threshold: int = 4, drop_neutral: bool = False) -> str:
    rule = f"rating >= {threshold} -> 1; else 0"
    return rule + ("; rating 3 dropped" if drop_neutral else "")


LABEL_RULE = label_rule()
ENCODING = "latin-1"
_BLOCK_BYTES = 4 << 20


@dataclass(frozen=True)
class _Shard:
    splits: tuple[int, ...] = (0, 1, 2)


def _lines(loc: Location, name: str) -> Iterator[tuple[int, list[str]]]:
    """(0-based number of the first line, lines) blocks of one file."""
    path = loc.path(name)
    try:
        raw = loc.fs.open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{loc.url_of(name)}: not found (an ML-1M folder holds {', '.join(FILES)})") from None
    except Exception as exc:
        raise loc.error(f"cannot open {loc.url_of(name)}", exc) from None
    first = 0
    with raw, io.TextIOWrapper(raw, encoding=ENCODING, newline="") as text:
        while True:
            block = text.readlines(_BLOCK_BYTES)
            if not block:
                return
            yield first, block
            first += len(block)


def _parse(url: str, number: int, line: str, width: int) -> list[str] | None:
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    parts = line.split("::")
    if len(parts) != width:
        raise DataError(f"{url}: line {number + 1}: {len(parts)} '::'-separated fields, expected {width}: {line[:80]!r}")
    return parts


def _int(url: str, number: int, column: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{url}: line {number + 1}: column {column!r} = {value!r}; expected an integer") from None


class MovieLensSource(Source):
    created_by = "data_tools.movielens"
    label = LABEL
    group = "UserID"

    def __init__(
        self, input_url: str, fields: list, seed: int, fractions: tuple[float, float, float],
        storage_options: Mapping[str, Any] | None, min_count: int, *,
        threshold: int = 4, drop_neutral: bool = False, split_rule: str = "exact",
    ) -> None:
        self.loc = resolve(input_url, storage_options)
        self.fields = fields
        self.seed, self.fractions, self.min_count = seed, fractions, min_count
        self.threshold, self.drop_neutral, self.split_rule = threshold, drop_neutral, split_rule
        self._split: np.ndarray | None = None  # exact split, computed on first read
        for name in FILES:
            try:
                exists = self.loc.fs.exists(self.loc.path(name))
            except Exception as exc:
                raise self.loc.error(f"cannot access {self.loc.url_of(name)}", exc) from None
            if not exists:
                raise DataError(f"{self.loc.url_of(name)}: not found (an ML-1M folder holds {', '.join(FILES)})")

    def shards(self, engine: Engine) -> list[_Shard]:
        return [_Shard()]  # ~1M ratings: one stream

    def _tables(self) -> tuple[dict[str, tuple[str, str, str]], dict[str, str]]:
        users: dict[str, tuple[str, str, str]] = {}
        url = self.loc.url_of("users.dat")
        for first, block in _lines(self.loc, "users.dat"):
            for k, line in enumerate(block):
                parts = _parse(url, first + k, line, 5)
                if parts:
                    users[str(_int(url, first + k, "UserID", parts[0]))] = (parts[1], parts[2], parts[3])
        movies: dict[str, str] = {}
        url = self.loc.url_of("movies.dat")
        for first, block in _lines(self.loc, "movies.dat"):
            for k, line in enumerate(block):
                text = line.rstrip("\r\n")
                if not text.strip():
                    continue
                movie, sep, rest = text.partition("::")
                title, sep2, genres = rest.rpartition("::")  # titles may contain ':'
                if not sep or not sep2:
                    raise DataError(f"{url}: line {first + k + 1}: expected MovieID::Title::Genres: {text[:80]!r}")
                movies[str(_int(url, first + k, "MovieID", movie))] = genres
        return users, movies

    def _kept_ratings(self) -> int:
        """Ratings the dataset keeps (non-blank lines, minus rating 3 with drop_neutral); a bad
        line is reported by the reading pass."""
        n = 0
        for _, block in _lines(self.loc, "ratings.dat"):
            for line in block:
                if not line.strip():
                    continue
                if self.drop_neutral and line.split("::")[2:3] == ["3"]:
                    continue
                n += 1
        return n

    def _exact_split(self) -> np.ndarray:
        if self._split is None:
            self._split = exact_split(self._kept_ratings(), self.seed, self.fractions)
        return self._split

    def read(self, shard: _Shard, names: Sequence[str]) -> Iterator[Chunk]:
        users, movies = self._tables()
        url = self.loc.url_of("ratings.dat")
        plans = {f.name: f for f in self.fields}
        exact = self._exact_split() if self.split_rule == "exact" else None
        kept = 0  # kept ratings before this block (index into the exact split)
        for first, block in _lines(self.loc, "ratings.dat"):
            rows: list[int] = []
            uids: list[str] = []
            mids: list[str] = []
            labels: list[float] = []
            for k, line in enumerate(block):
                number = first + k
                parts = _parse(url, number, line, 4)
                if parts is None:
                    continue
                uid = str(_int(url, number, "UserID", parts[0]))
                mid = str(_int(url, number, "MovieID", parts[1]))
                rating = _int(url, number, "Rating", parts[2])
                if not 1 <= rating <= 5:
                    raise DataError(f"{url}: line {number + 1}: column 'Rating' = {rating}; expected 1..5")
                if uid not in users:
                    raise DataError(f"{url}: line {number + 1}: UserID {uid} is not in users.dat")
                if mid not in movies:
                    raise DataError(f"{url}: line {number + 1}: MovieID {mid} is not in movies.dat")
                if rating == 3 and self.drop_neutral:
                    continue
                rows.append(number)
                uids.append(uid)
                mids.append(mid)
                labels.append(1.0 if rating >= self.threshold else 0.0)
            if not rows:
                continue
            if exact is not None:
                if kept + len(rows) > len(exact):
                    raise DataError(f"{url}: changed while being read (more ratings than counted)")
                split = exact[kept : kept + len(rows)]
            else:
                split = split_of_row_numbers(np.asarray(rows, dtype=np.uint64), self.seed, self.fractions)
            kept += len(rows)
            user_id = pa.array(uids, pa.string())
            columns = {
                "UserID": user_id,
                "Gender": pa.array([users[u][0] for u in uids], pa.string()),
                "Age": pa.array([users[u][1] for u in uids], pa.string()),
                "Occupation": pa.array([users[u][2] for u in uids], pa.string()),
                "MovieID": pa.array(mids, pa.string()),
            }
            tokens: dict[str, pa.Array] = {}
            for name in names:
                plan = plans[name]
                if name == GENRES:
                    lists = split_strings(pa.array([movies[m] for m in mids], pa.string()), plan.splitter)
                    assert plan.max_len is not None
                    tokens[name] = clean_lists(lists, plan.max_len, plan.keep)
                else:
                    tokens[name] = columns[name]
            groups = stable_hash(user_id).view(np.int64)
            groups[groups == 0] = 1
            yield Chunk(np.asarray(labels, dtype=np.float32), tokens, split, groups)

    def spec(self) -> dict[str, Any]:
        return {
            "format": "movielens",
            "input": display_url(self.loc.url),
            "label_rule": label_rule(self.threshold, self.drop_neutral),
            "group": self.group,
            "split": list(self.fractions),
            "split_rule": (
                "seeded permutation of the kept ratings; valid, test = ceil(n * fraction)"
                if self.split_rule == "exact" else "splitmix64(seed, 0-based line number in ratings.dat)"
            ),
            "fields": [f.name for f in self.fields],
            "seed": self.seed,
            "min_count": self.min_count,
        }


def prepare_movielens(
    input_url: str,
    out_url: str,
    options: MovieLensOptions | None = None,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    engine: Engine | None = None,
    progress: Progress | None = None,
    **keys: Any,
) -> Manifest:
    """Convert an ML-1M folder (see the module docstring for fields, label rule and split).

    `options` and/or its flat keys (`min_count`, `split`, `seed`, ...; data_tools.options).
    """
    opts = MovieLensOptions.build(options, keys)
    fractions = check_split(opts.splits.split)
    names = FIELDS + ([GENRES] if opts.genres else [])
    plans = resolve_fields(names, **opts.vocab.field_defaults(), kinds=("categorical", "sequence"), fixed=FIXED)
    source = MovieLensSource(
        input_url, plans, opts.splits.seed, fractions, storage_options, opts.vocab.min_count,
        threshold=opts.label_threshold, drop_neutral=opts.drop_neutral, split_rule=opts.split_rule,
    )
    return prepare(
        source, out_url, opts.write, engine=engine, overwrite=overwrite, storage_options=storage_options,
        vocab_memory_mb=opts.vocab.vocab_memory_mb, progress=progress,
    )
