"""Split metrics against sklearn (spec sections 6 and 8)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from tf4ctr_dist.metrics import difficulty_buckets, evaluate, group_auc, logloss, roc_auc


def _data(n=3000, n_groups=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.35).astype(np.float32)
    scores = np.round(rng.uniform(0.02, 0.98, n) * 0.6 + labels * 0.3, 2)  # many ties
    groups = rng.integers(0, n_groups, n)
    return labels, scores, groups


def _reference_gauc(labels, scores, groups):
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(labels[m])) == 2:
            num += m.sum() * roc_auc_score(labels[m], scores[m])
            den += m.sum()
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_matches_sklearn_with_ties(seed):
    labels, scores, _ = _data(seed=seed)
    assert len(np.unique(scores)) < len(scores) // 10
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_all_tied_is_half_and_single_class_is_nan():
    assert roc_auc([0, 1, 0, 1], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))


@pytest.mark.parametrize("seed", [0, 1])
def test_group_auc_matches_per_group_sklearn(seed):
    labels, scores, groups = _data(seed=seed)
    expected = _reference_gauc(labels, scores, groups)
    assert group_auc(labels, scores, groups) == pytest.approx(expected, abs=1e-12)


def test_group_auc_skips_single_label_groups():
    labels = np.array([1, 0, 0, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.6, 0.3, 0.3])
    groups = np.array([5, 5, 7, 7, 9, 9, 11, 11])  # groups 9 (all 1) and 11 (all 0) skipped
    # group 5: AUC 1 (n=2), group 7: AUC 0 (n=2) -> (2*1 + 2*0) / 4
    assert group_auc(labels, scores, groups) == pytest.approx(0.5)
    # Unsorted input, string groups: same answer.
    perm = np.array([3, 6, 0, 5, 1, 7, 2, 4])
    assert group_auc(labels[perm], scores[perm], groups[perm].astype(str)) == pytest.approx(0.5)


def test_group_auc_fast_on_a_million_rows():
    rng = np.random.default_rng(0)
    n = 1_000_000
    labels = (rng.random(n) < 0.3).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    groups = rng.integers(0, 100_000, n)
    start = time.perf_counter()
    value = group_auc(labels, scores, groups)
    assert time.perf_counter() - start < 5.0
    assert 0.45 < value < 0.55


def test_logloss_matches_sklearn_and_clips():
    labels, scores, _ = _data()
    assert logloss(labels, scores) == pytest.approx(log_loss(labels, scores), abs=1e-12)
    eps = 1e-7
    # p = 0 for a positive and p = 1 for a negative are clipped to eps / 1 - eps.
    expected = -(math.log(eps) + math.log(eps) + math.log(0.5)) / 3
    assert logloss([1, 0, 1], [0.0, 1.0, 0.5]) == pytest.approx(expected, rel=1e-9)


def test_difficulty_buckets():
    labels = [1, 1, 1, 1, 0, 0, 0]
    probs = [0.95, 0.7, 0.5, 0.2, 0.1, 0.35, 0.6]
    # positive gaps 0.05 well, 0.3 poorly, 0.5 poorly, 0.8 mis; negative 0.1 well, 0.35 poorly,
    # 0.6 misclassified (the upper threshold is inclusive for "misclassified").
    out = difficulty_buckets(labels, probs)
    assert {k: out["positive"][k] for k in ("n", "well", "poorly", "misclassified")} == {
        "n": 4, "well": 1, "poorly": 2, "misclassified": 1
    }
    assert {k: out["negative"][k] for k in ("n", "well", "poorly", "misclassified")} == {
        "n": 3, "well": 1, "poorly": 1, "misclassified": 1
    }
    assert out["positive"]["poorly_frac"] == pytest.approx(0.5)
    assert out["negative"]["well_frac"] == pytest.approx(1 / 3)


def test_evaluate_keys():
    labels, scores, groups = _data()
    assert set(evaluate(labels, scores)) == {"AUC", "logloss"}
    res = evaluate(labels, scores, groups)
    assert set(res) == {"AUC", "gAUC", "logloss"}
    assert res["AUC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
