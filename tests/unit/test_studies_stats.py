"""Multi-seed statistics: p-values equal scipy.stats', pairing and the seed table."""

from __future__ import annotations

import math

import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from tf4ctr_dist.studies.stats import (  # noqa: E402
    compare, markdown_table, paired_ttest, seed_table, summarize, t_two_tailed_p, welch_ttest)

# Five-seed AUCs of the shape of the paper's Table 4 (fixed numbers, not random).
A = [0.98512, 0.98431, 0.98477, 0.98555, 0.98493]
B = [0.98401, 0.98388, 0.98432, 0.98467, 0.98420]
C = [0.9841, 0.9850, 0.9839]  # three runs: a Welch comparison against A


def test_welch_equals_scipy():
    ours = welch_ttest(A, C)
    ref = scipy_stats.ttest_ind(A, C, equal_var=False)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.kind == "welch"


def test_paired_equals_scipy():
    ours = paired_ttest(A, B)
    ref = scipy_stats.ttest_rel(A, B)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-12)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert ours.p < 0.01  # these differ clearly; a welch test would give another number
    assert ours.p != pytest.approx(scipy_stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-3)


@pytest.mark.parametrize("t, df", [(0.0, 3), (0.5, 1), (2.1, 4), (-3.7, 7.3), (12.0, 2), (1.96, 1000), (40.0, 9)])
def test_t_tail_equals_scipy(t, df):
    assert t_two_tailed_p(t, df) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-9, abs=1e-300)


def test_compare_pairs_only_matching_seeds():
    a = dict(zip(range(5), A))
    b = dict(zip(range(5), B))
    assert compare(a, b).kind == "paired"
    assert compare(a, b).p == pytest.approx(scipy_stats.ttest_rel(A, B).pvalue, rel=1e-9)
    shifted = dict(zip(range(1, 6), B))
    assert compare(a, shifted).kind == "welch"
    assert compare(a, shifted).p == pytest.approx(scipy_stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-9)


def test_undefined_tests_are_nan():
    assert math.isnan(welch_ttest([0.9], [0.8, 0.7]).p)
    assert math.isnan(paired_ttest([0.9, 0.9], [0.8, 0.8]).p)  # zero variance of the differences
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ttest([1, 2], [1])


def test_seed_table_and_markdown():
    rows = [{"config": "tf", "seed": s, "AUC": a} for s, a in enumerate(A)]
    rows += [{"config": "bce", "seed": s, "AUC": b} for s, b in enumerate(B)]
    rows += [{"config": "other", "seed": 10 + s, "AUC": c} for s, c in enumerate(C)]
    table = seed_table(rows, ["AUC"], baseline="bce")
    by = {r["config"]: r for r in table}
    assert [r["config"] for r in table] == ["tf", "bce", "other"]
    assert by["tf"]["AUC_mean"] == pytest.approx(sum(A) / 5)
    assert by["tf"]["AUC_std"] == pytest.approx(summarize(A).std) and summarize(A).std == pytest.approx(
        scipy_stats.tstd(A))
    assert by["tf"]["AUC_test"] == "paired" and by["other"]["AUC_test"] == "welch"
    assert by["tf"]["AUC_p"] == pytest.approx(scipy_stats.ttest_rel(A, B).pvalue, rel=1e-9)
    assert by["other"]["AUC_p"] == pytest.approx(scipy_stats.ttest_ind(C, B, equal_var=False).pvalue, rel=1e-9)
    md = markdown_table(table, ["AUC"], baseline="bce")
    assert "| tf | 5 |" in md and "(paired)" in md and "(welch)" in md and "baseline" in md
    with pytest.raises(ValueError, match="baseline 'nope'"):
        seed_table(rows, ["AUC"], baseline="nope")
