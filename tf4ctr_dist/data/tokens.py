"""Raw values -> the tokens and hashes a dataset's ids come from: one definition, used by the
preparation (data_tools.vocab / data_tools.fields) and by serving (tf4ctr_dist.serving.features),
so a served row maps to exactly the ids its training rows got.

* Every value is read as text: nulls become MISSING (""), non-strings their decimal text (Arrow's
  cast), so an int 123 and the string "123" are the same token.
* stable_hash: SipHash-2-4 of the UTF-8 text with pandas' fixed key, the same on every machine.
* bucketize_criteo: missing -> 0, v > 2 -> floor(ln(v)^2), else int(v) (toward zero).
* numeric fields embedded as value x vector: missing_values (null or empty text) and normalize,
  (x - shift) / divisor in float64, stored as float32, with the statistics `prepare` fit on train.
* lookup_weights: with such fields every lookup of a batch carries a weight (reader and serving).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

MISSING = ""  # an empty cell; never a counted token (-> OOV); hashed like any other value


def as_strings(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One string array (dictionary decoded, non-strings as text); null -> "" (missing)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    if not pa.types.is_string(column.type):
        column = column.cast(pa.string())
    return column.fill_null(MISSING) if column.null_count else column


def stable_hash(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """uint64 SipHash of every value's text; each distinct value hashed once."""
    strings = as_strings(column)
    if len(strings) == 0:
        return np.empty(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(strings)
    uniques = encoded.dictionary.to_numpy(zero_copy_only=False)
    hashed = pd.util.hash_array(np.asarray(uniques, dtype=object), categorize=False)
    return hashed[encoded.indices.to_numpy()]


def bucketize_criteo(values: np.ndarray) -> np.ndarray:
    """Criteo numeric bucketing on floats (NaN = missing): missing -> 0; v > 2 -> floor(ln(v)^2);
    else int(v) (truncating toward zero)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros(values.shape, dtype=np.int64)
    present = ~np.isnan(values)
    big = present & (values > 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[big] = np.floor(np.log(values[big]) ** 2).astype(np.int64)
    small = present & ~big
    out[small] = np.trunc(values[small]).astype(np.int64)
    return out


NORMALIZERS = ("none", "min_max", "standard")


def missing_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n,) bool: where a numeric column holds no value (null, or text that is empty after
    trimming spaces, as a CSV cell)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    missing = column.is_null()
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        missing = pc.or_(missing, pc.equal(pc.utf8_trim_whitespace(column), "")).fill_null(True)
    return missing.to_numpy(zero_copy_only=False)


def normalize(values: np.ndarray, shift: float, divisor: float) -> np.ndarray:
    """(x - shift) / divisor of float64 values (NaN = missing stays NaN), as float32: the value
    a numeric field's lookup is weighted with, the same in prepare and serving."""
    return ((np.asarray(values, dtype=np.float64) - shift) / divisor).astype(np.float32)


def lookup_weights(kind: str, lengths: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """One field's block of the KJT weights of a dataset with numeric fields (a weighted EBC
    SUM-pools weight x row; see tf4ctr_dist.modules.embedding.field_tables).

    kind: the field's stored kind (manifest); lengths: (n,) lookups per row; values: numeric
    fields only, (n,) the values, NaN where missing (length 0). A categorical id weighs 1, each
    id of a sequence of length L weighs 1/L (so the sum is the mean), a numeric lookup its value.
    Returns (lengths.sum(),) float32.
    """
    if kind == "numeric":
        assert values is not None
        return values[lengths > 0].astype(np.float32, copy=False)
    if kind == "sequence":
        return np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
    return np.ones(int(lengths.sum()), dtype=np.float32)
