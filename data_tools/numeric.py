"""Numeric fields embedded as value x vector: raw values, their normaliser, and its statistics.

A numeric field with `normalizer: none | min_max | standard` (data_tools.fields) is stored as a
float32 column of (x - shift) / divisor (tf4ctr_dist.data.tokens.normalize; null = missing):
  none      shift 0, divisor 1 (the raw value)
  min_max   shift = min, divisor = max - min over the train split (FuxiCTR's MinMaxScaler)
  standard  shift = mean, divisor = the population standard deviation over train (StandardScaler)
A divisor of 0 (a constant column) or a train split without values becomes 1. Missing values are
left out of the statistics and stay missing (the model gives them the zero vector; FuxiCTR
fills them with 0 before normalising instead).

The statistics are exact. A dataset must not depend on the engine or on how the input is cut
into shards and chunks (data_tools.engine), but a float sum depends on the order of its
additions. So each chunk's values and squares are summed as exact integers (`exact_sum`: every
float64 is an integer multiple of 2**-EXP_BIAS), merged by integer addition in any order, and
rounded once at the end. A square is kept exactly as p + e (Dekker's product: p = fl(x*x), e its
rounding error), exact for 1e-140 < |x| < 1e150; standardising larger values is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from tf4ctr_dist.data.errors import DataError
from tf4ctr_dist.data.tokens import missing_values, normalize

EXP_BIAS = 1126  # frexp's 53-bit mantissas of float64s reach down to 2**(-1074 - 52)
FITTED = ("min_max", "standard")  # the normalisers that need train statistics
MAX_STANDARD = 1e150  # beyond, squares overflow


def exact_sum(values: np.ndarray) -> int:
    """The exact sum of finite float64 ``values`` times 2**EXP_BIAS, as a Python int."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return 0
    fraction, exponent = np.frexp(values)  # values = fraction * 2**exponent, |fraction| in [0.5, 1)
    mantissa = (fraction * 2.0**53).astype(np.int64)  # exact: 53 significant bits
    shift = exponent.astype(np.int64) + (EXP_BIAS - 53)  # >= 0 for every float64
    order = np.argsort(shift, kind="stable")
    shift, mantissa = shift[order], mantissa[order]
    starts = np.flatnonzero(np.r_[True, shift[1:] != shift[:-1]])
    # Two 32-bit halves: int64 sums of each stay exact for up to 2**31 values.
    low = np.add.reduceat(mantissa & 0xFFFFFFFF, starts)
    high = np.add.reduceat(mantissa >> 32, starts)
    return sum(((int(h) << 32) + int(lo)) << int(s) for h, lo, s in zip(high, low, shift[starts]))


def _square_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(p, e) with p + e == x * x exactly (Dekker's split into 26-bit halves)."""
    c = 134217729.0 * x  # 2**27 + 1
    hi = c - (c - x)
    lo = x - hi
    p = x * x
    return p, ((hi * hi - p) + 2.0 * hi * lo) + lo * lo


@dataclass(frozen=True)
class NumericStats:
    """Train statistics of one numeric field's present values, mergeable in any order."""

    count: int = 0
    total: int = 0  # exact sum of the values * 2**EXP_BIAS
    squares: int = 0  # exact sum of their squares * 2**EXP_BIAS
    min: float = math.inf
    max: float = -math.inf

    @classmethod
    def of(cls, values: np.ndarray) -> "NumericStats":
        """Of finite float64 values (missing ones already left out)."""
        values = np.asarray(values, dtype=np.float64)
        if values.size == 0:
            return cls()
        safe = values[np.abs(values) <= MAX_STANDARD]  # larger ones: `normalizer` refuses them by name
        p, e = _square_parts(safe)
        return cls(int(values.size), exact_sum(values), exact_sum(p) + exact_sum(e),
                   float(values.min()), float(values.max()))

    def __add__(self, other: "NumericStats") -> "NumericStats":
        return NumericStats(self.count + other.count, self.total + other.total, self.squares + other.squares,
                            min(self.min, other.min), max(self.max, other.max))

    @property
    def mean(self) -> float:
        return float(Fraction(self.total, self.count << EXP_BIAS)) if self.count else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0, as StandardScaler)."""
        if not self.count:
            return 0.0
        n = self.count
        var = Fraction(n * self.squares * (1 << EXP_BIAS) - self.total * self.total, (n * n) << (2 * EXP_BIAS))
        return math.sqrt(max(float(var), 0.0))

    def to_json(self) -> str:
        """Lossless text (Python ints and shortest-repr floats), for Ray shard results."""
        return json.dumps([self.count, self.total, self.squares, self.min, self.max])

    @classmethod
    def from_json(cls, text: str) -> "NumericStats":
        count, total, squares, lo, hi = json.loads(text)
        return cls(count, total, squares, float(lo), float(hi))


@dataclass(frozen=True)
class ValueNormalizer:
    """How one numeric field's raw values become its stored float32 values."""

    name: str
    normalizer: str  # none | min_max | standard
    shift: float = 0.0
    divisor: float = 1.0
    stats: NumericStats | None = None  # the train statistics (fitted normalisers)

    size = 1  # embedding rows: the field's one vector

    @classmethod
    def fit(cls, name: str, normalizer: str, stats: NumericStats | None) -> "ValueNormalizer":
        if normalizer not in FITTED:
            return cls(name, normalizer)
        assert stats is not None
        if not stats.count:
            return cls(name, normalizer, 0.0, 1.0, stats)
        if normalizer == "min_max":
            shift, divisor = stats.min, stats.max - stats.min
        else:
            if max(-stats.min, stats.max) > MAX_STANDARD:
                raise DataError(f"numeric field {name!r}: train values up to {max(-stats.min, stats.max):g} are too "
                                f"large to standardise (limit {MAX_STANDARD:g}); use normalizer: min_max or none")
            shift, divisor = stats.mean, stats.std
        return cls(name, normalizer, shift, divisor if divisor > 0 and math.isfinite(divisor) else 1.0, stats)

    def apply(self, values: pa.Array) -> pa.Array:
        """float64 values (null = missing) -> the stored float32 column (null = missing)."""
        missing = values.is_null().to_numpy(zero_copy_only=False)
        x = values.fill_null(0.0).to_numpy(zero_copy_only=False)
        return pa.array(normalize(x, self.shift, self.divisor), pa.float32(), mask=missing)

    def describe(self) -> dict[str, Any]:
        """For the manifest's spec (and serving: raw value -> (x - shift) / divisor)."""
        out: dict[str, Any] = {"normalizer": self.normalizer, "shift": self.shift, "divisor": self.divisor}
        if self.stats is not None:
            s = self.stats
            exact = s.count and max(-s.min, s.max) <= MAX_STANDARD
            out["train_stats"] = {"count": s.count, "mean": s.mean, "std": s.std if exact else None,
                                  "min": s.min if s.count else None, "max": s.max if s.count else None}
        return out


def present_values(values: np.ndarray, missing: np.ndarray, where: Callable[[int], str], name: str) -> pa.Array:
    """float64 values with `missing` as nulls; a NaN or infinite value that is not missing is a
    DataError naming its row (`where(row)`, e.g. "FILE: line N") and the column."""
    bad = np.flatnonzero(~np.isfinite(values) & ~missing)
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{where(row)}: column {name!r} = {values[row]}; a numeric field embedded as value x "
                        "vector needs finite numbers (an empty cell or null is a missing value)")
    return pa.array(np.where(missing, 0.0, values), pa.float64(), mask=missing)


def column_values(column: pa.Array | pa.ChunkedArray, where: Callable[[int], str], name: str,
                  parse: Callable[[Any], np.ndarray] | None = None) -> pa.Array:
    """A raw numeric column (numbers, or text when `parse` turns it into float64 with NaN for
    missing) -> float64 values, null where missing; see present_values."""
    missing = missing_values(column)
    if parse is not None:
        values = parse(column)
    else:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        values = column.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
    return present_values(np.asarray(values, dtype=np.float64), missing, where, name)
