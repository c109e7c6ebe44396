"""Derived features computed from one raw string column on the way in (FuxiCTR's `preprocess`
names, rules as in the BARS KKBox_x1 / Avazu_x4 preparations):

    extract_country_code  ISRC -> its first two characters (the registrant country); missing -> ""
    bucketize_age         age (KKBox members' bd) -> "" when missing, unparsable, < 1 or > 95;
                          else "1" (<= 10), "2" (<= 20), ... "6" (<= 60), "7" (> 60)
    convert_hour          Avazu hour YYMMDDHH -> hour of day "0".."23"
    convert_weekday       Avazu hour YYMMDDHH -> weekday of 20YY-MM-DD, "0" Sunday .. "6" Saturday
    convert_weekend       Avazu hour YYMMDDHH -> "1" on Saturday or Sunday, else "0"

Each function maps a string array to a string array of tokens ("" = missing, maps to OOV); a
malformed value where the rule has no missing case (an Avazu hour) is a DataError naming the row
through `where(row)` (e.g. "FILE: line N").
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tf4ctr_dist.data.errors import DataError

from .fields import as_text

Where = Callable[[int], str]


def extract_country_code(column: pa.Array, where: Where, name: str) -> pa.Array:
    return pc.utf8_slice_codeunits(as_text(column).fill_null(""), 0, 2)


AGE_EDGES = (10, 20, 30, 40, 50, 60)


def bucketize_age(column: pa.Array, where: Where, name: str) -> pa.Array:
    text = pc.utf8_trim_whitespace(as_text(column).fill_null(""))
    values = []
    for value in text.to_pylist():
        try:
            age = float(value)
        except ValueError:
            age = float("nan")
        values.append(age)
    ages = np.asarray(values, dtype=np.float64)
    valid = (ages >= 1) & (ages <= 95)  # NaN compares False: missing
    buckets = np.searchsorted(np.asarray(AGE_EDGES, dtype=np.float64), np.where(valid, ages, 0), side="left") + 1
    tokens = pa.array(buckets).cast(pa.string())
    return pc.if_else(pa.array(valid), tokens, pa.scalar(""))


def _hours(column: pa.Array, where: Where, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(dates as datetime64[D], hour of day) of YYMMDDHH values; DataError on a malformed one."""
    text = pc.utf8_trim_whitespace(as_text(column).fill_null(""))
    ok = pc.and_(pc.equal(pc.utf8_length(text), 8), pc.utf8_is_digit(text)).to_numpy(zero_copy_only=False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{where(row)}: column {name!r} = {text[row].as_py()!r}; expected YYMMDDHH (8 digits)")
    digits = np.asarray(text.to_pylist(), dtype="U8")
    year = np.array([d[0:2] for d in digits], dtype=np.int64) + 2000
    month = np.array([d[2:4] for d in digits], dtype=np.int64)
    day = np.array([d[4:6] for d in digits], dtype=np.int64)
    hour = np.array([d[6:8] for d in digits], dtype=np.int64)
    bad = (month < 1) | (month > 12) | (day < 1) | (day > 31) | (hour > 23)
    dates = np.array([f"{y:04d}-{m:02d}-{d:02d}" if not b else "1970-01-01" for y, m, d, b in zip(year, month, day, bad)],
                     dtype="datetime64[D]") if len(digits) else np.empty(0, dtype="datetime64[D]")
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(row)}: column {name!r} = {digits[row]!r}; not a valid YYMMDDHH date and hour")
    return dates, hour


def _weekday(dates: np.ndarray) -> np.ndarray:
    # 1970-01-01 was a Thursday (4 with Sunday = 0)
    return (dates.astype(np.int64) + 4) % 7


def convert_hour(column: pa.Array, where: Where, name: str) -> pa.Array:
    return pa.array(_hours(column, where, name)[1]).cast(pa.string())


def convert_weekday(column: pa.Array, where: Where, name: str) -> pa.Array:
    return pa.array(_weekday(_hours(column, where, name)[0])).cast(pa.string())


def convert_weekend(column: pa.Array, where: Where, name: str) -> pa.Array:
    weekday = _weekday(_hours(column, where, name)[0])
    return pa.array(((weekday == 0) | (weekday == 6)).astype(np.int64)).cast(pa.string())


PREPROCESS: dict[str, Callable[[pa.Array, Where, str], pa.Array]] = {
    "extract_country_code": extract_country_code,
    "bucketize_age": bucketize_age,
    "convert_hour": convert_hour,
    "convert_weekday": convert_weekday,
    "convert_weekend": convert_weekend,
}
