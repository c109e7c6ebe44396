"""gather_across_ranks over 2 gloo processes with an uneven split gives whole-split metrics.

sklearn is imported inside the tests only: the spawned ranks import this module to find their
function, and keeping it light keeps the test fast.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed._launch import run_gloo
from tf4ctr_dist.metrics import evaluate, gather_across_ranks

SPLIT = (37, 63)


def _data(n: int = sum(SPLIT)):
    rng = np.random.default_rng(7)
    labels = (rng.random(n) < 0.4).astype(np.float32)
    probs = np.round(rng.uniform(0.06, 0.94, n), 1)  # rounding creates ties; no clipping
    groups = rng.integers(0, 8, n)
    return labels, probs, groups


def _worker(rank, world_size, labels, probs, groups):
    lo = sum(SPLIT[:rank])
    hi = lo + SPLIT[rank]
    ids = torch.arange(lo, hi, dtype=torch.int64)
    # Mixed inputs: tensors of several dtypes and a numpy array.
    g_labels, g_probs, g_groups, g_ids = gather_across_ranks(
        torch.from_numpy(labels[lo:hi]),
        torch.from_numpy(probs[lo:hi]),
        groups[lo:hi],
        ids,
    )
    # A rank holding nothing must not break the collective.
    (g_empty,) = gather_across_ranks(
        torch.arange(5, dtype=torch.float32) if rank == 0 else torch.empty(0)
    )
    return {
        "metrics": evaluate(g_labels.numpy(), g_probs.numpy(), g_groups),
        "ids": g_ids.numpy(),
        "labels": g_labels.numpy(),
        "types": (g_labels.dtype, g_probs.dtype, type(g_groups).__name__, g_ids.dtype),
        "empty": g_empty.numpy(),
    }


def _reference_gauc(labels, probs, groups):
    from sklearn.metrics import roc_auc_score

    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(labels[m])) == 2:
            num += m.sum() * roc_auc_score(labels[m], probs[m])
            den += m.sum()
    return num / den


def test_uneven_gather_matches_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    labels, probs, groups = _data()
    results = run_gloo(_worker, 2, labels, probs, groups, timeout=90)
    for res in results:
        # Every sample exactly once, in rank order.
        np.testing.assert_array_equal(res["ids"], np.arange(len(labels)))
        np.testing.assert_array_equal(res["labels"], labels)
        assert res["types"] == (torch.float32, torch.float64, "ndarray", torch.int64)
        np.testing.assert_array_equal(res["empty"], np.arange(5, dtype=np.float32))
        m = res["metrics"]
        assert m["AUC"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
        assert m["gAUC"] == pytest.approx(_reference_gauc(labels, probs, groups), abs=1e-12)
        assert m["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-12)


def test_gather_without_process_group_returns_inputs():
    x = torch.arange(3)
    (y,) = gather_across_ranks(x)
    assert y is x


def _failing_worker(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def test_run_gloo_reports_child_failure():
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        run_gloo(_failing_worker, 2, timeout=60)
