"""Row -> split assignments that need the row count up front (the BARS protocols), as opposed to
the streaming per-row hash of data_tools.criteo.split_of_row_numbers.

- `exact_split`: a seeded random permutation with exact split sizes, valid and test rounded up
  (ceil(n * fraction), as scikit-learn's train_test_split rounds a test fraction): ML-1M's
  1,000,209 ratings at 8:1:1 give 800,167 / 100,021 / 100,021, the sizes of the authors' logs.
- `stratified_folds`: BARS x4 (reczoo/Datasets: Criteo_x4, Avazu_x4): rows cut into 10 stratified
  folds (labels balanced per fold), seed 2018; folds 0-7 train, 8 valid, 9 test.

Both reproduce the published split SIZES (and label balance); the row-to-split assignment comes
from numpy's PCG64 generator, so it does not pick the same rows as the authors' scripts.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from tf4ctr_dist.data.errors import DataError


def exact_sizes(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """(train, valid, test) row counts: valid and test ceil(n * f), train the rest."""
    valid = min(n, math.ceil(n * fractions[1] - 1e-9))
    test = min(n - valid, math.ceil(n * fractions[2] - 1e-9))
    return n - valid - test, valid, test


def exact_split(n: int, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """(n,) int8 split index per row (0 train, 1 valid, 2 test) with exact_sizes counts:
    rows perm[:valid] are valid, the next `test` rows test, perm = a seeded permutation."""
    _, valid, test = exact_sizes(n, fractions)
    perm = np.random.default_rng(seed).permutation(n)
    out = np.zeros(n, dtype=np.int8)
    out[perm[:valid]] = 1
    out[perm[valid : valid + test]] = 2
    return out


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(n,) fold index per row: each label class is shuffled (seeded) and dealt round-robin
    over the folds, so fold sizes differ by at most one per class and every fold keeps the
    overall positive rate (the rule of scikit-learn's StratifiedKFold with shuffle)."""
    labels = np.asarray(labels)
    if folds < 2:
        raise DataError(f"stratified split needs at least 2 folds, got {folds}")
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=np.int16)
    offset = 0
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        rows = rows[rng.permutation(len(rows))]
        # continue the deal where the previous class stopped: fold sizes stay within one overall
        out[rows] = (np.arange(len(rows)) + offset) % folds
        offset = (offset + len(rows)) % folds
    return out


def folds_to_splits(fold: np.ndarray, assignment: Sequence[int] = (8, 1, 1)) -> np.ndarray:
    """Fold index -> split index: the first assignment[0] folds train, the next valid, the rest test."""
    bounds = np.cumsum(assignment)
    return np.searchsorted(bounds, fold, side="right").astype(np.int8)
