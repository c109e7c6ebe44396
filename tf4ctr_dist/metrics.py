"""Exact metrics over a whole split (spec sections 6 and 8), numpy; plus a torch.distributed gather.

Every metric takes flat arrays (anything np.asarray accepts, any shape that flattens to (N,)).
Labels are {0, 1}; a label > 0.5 counts as positive.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

LOGLOSS_EPS = 1e-7


def _flat(a, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype).reshape(-1)


def _grouped_auc(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mann-Whitney AUC of every group at once.

    Sorting by (group, score) makes every group a contiguous block; tied scores inside a group
    get their average rank. Returns (auc per group (G,), size per group (G,)); the AUC is NaN
    for a group that lacks one of the two labels.
    """
    order = np.lexsort((scores, groups))  # last key is the primary one
    g = groups[order]
    s = scores[order]
    pos = labels[order] > 0.5
    n = len(order)

    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = g[1:] != g[:-1]
    new_run = new_group.copy()  # a tie run never crosses a group border
    new_run[1:] |= s[1:] != s[:-1]

    # Tie run [start, end) (0-based positions) holds 1-based ranks start+1..end: mean (start+end+1)/2.
    run_start = np.flatnonzero(new_run)
    run_end = np.append(run_start[1:], n)
    run_rank = (run_start + run_end + 1) / 2.0
    run_id = np.cumsum(new_run) - 1
    group_id = np.cumsum(new_group) - 1
    group_start = np.flatnonzero(new_group)
    rank_in_group = run_rank[run_id] - group_start[group_id]  # (N,) 1-based within the group

    n_g = np.bincount(group_id).astype(np.float64)
    n_pos = np.bincount(group_id, weights=pos.astype(np.float64))
    n_neg = n_g - n_pos
    rank_sum_pos = np.bincount(group_id, weights=np.where(pos, rank_in_group, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc, n_g


def roc_auc(labels, scores) -> float:
    """ROC AUC with ties at average rank (Mann-Whitney U); NaN if only one label is present."""
    y, s = _flat(labels, np.float64), _flat(scores, np.float64)
    if len(y) == 0:
        return float("nan")
    auc, _ = _grouped_auc(y, s, np.zeros(len(y), dtype=np.int64))
    return float(auc[0])


def group_auc(labels, scores, groups) -> float:
    """gAUC = sum_g n_g*AUC_g / sum_g n_g over the groups holding both labels (NaN if none)."""
    y, s, g = _flat(labels, np.float64), _flat(scores, np.float64), _flat(groups)
    if len(y) == 0:
        return float("nan")
    auc, n_g = _grouped_auc(y, s, g)
    keep = ~np.isnan(auc)
    if not keep.any():
        return float("nan")
    return float((auc[keep] * n_g[keep]).sum() / n_g[keep].sum())


def logloss(labels, probs) -> float:
    """Mean binary cross-entropy of probabilities clipped to [1e-7, 1 - 1e-7]."""
    y = _flat(labels, np.float64)
    p = np.clip(_flat(probs, np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def difficulty_buckets(
    labels, probs, thresholds: tuple[float, float] = (0.3, 0.6)
) -> dict[str, dict[str, float]]:
    """Bucket predictions by the gap |y - y_hat| (spec section 8, paper Fig. 10).

    well: gap < lo, poorly: lo <= gap < hi, misclassified: gap >= hi; done separately for
    positives and negatives. Returns {"positive"|"negative": {"n", "well", "poorly",
    "misclassified", "well_frac", "poorly_frac", "misclassified_frac"}}; fractions are of that
    class's count (0 when the class is absent).
    """
    lo, hi = thresholds
    y = _flat(labels, np.float64)
    gap = np.abs(y - _flat(probs, np.float64))
    out: dict[str, dict[str, float]] = {}
    for name, mask in (("positive", y > 0.5), ("negative", y <= 0.5)):
        gm = gap[mask]
        n = int(mask.sum())
        counts = {
            "well": int((gm < lo).sum()),
            "poorly": int(((gm >= lo) & (gm < hi)).sum()),
            "misclassified": int((gm >= hi).sum()),
        }
        row: dict[str, float] = {"n": n, **counts}
        for k, v in counts.items():
            row[f"{k}_frac"] = v / n if n else 0.0
        out[name] = row
    return out


def evaluate(labels, probs, groups=None) -> dict[str, float]:
    """{"AUC", "logloss"} plus "gAUC" when groups are given."""
    result = {"AUC": roc_auc(labels, probs)}
    if groups is not None:
        result["gAUC"] = group_auc(labels, probs, groups)
    result["logloss"] = logloss(labels, probs)
    return result


def gather_across_ranks(*arrays) -> tuple:
    """All-gather 1-D arrays/tensors of per-rank varying length; rank order, concatenated.

    Every rank must call it with the same number of arguments and the same dtypes. Returns a
    tuple with one entry per argument: numpy in -> numpy out, tensor in -> tensor on the input's
    device. Without an initialised process group the inputs are returned unchanged.
    Works over gloo (cpu) and nccl (moved to the current cuda device for the collective).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tuple(arrays)
    world = dist.get_world_size()
    comm_device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    tensors = [
        (a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a)))
        .detach()
        .reshape(-1)
        for a in arrays
    ]
    # One collective for all lengths: sizes[r, i] = length of argument i on rank r.
    local_sizes = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=comm_device)
    all_sizes = [torch.empty_like(local_sizes) for _ in range(world)]
    dist.all_gather(all_sizes, local_sizes)
    sizes = torch.stack(all_sizes).cpu()  # (world, n_args)

    out = []
    for i, (orig, t) in enumerate(zip(arrays, tensors)):
        max_len = int(sizes[:, i].max())
        # all_gather needs equal shapes, so pad to the longest rank and trim afterwards.
        send_dtype = torch.uint8 if t.dtype == torch.bool else t.dtype
        padded = torch.zeros(max_len, dtype=send_dtype, device=comm_device)
        padded[: t.numel()] = t.to(device=comm_device, dtype=send_dtype)
        recv = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(recv, padded)
        full = torch.cat([r[: int(sizes[rank, i])] for rank, r in enumerate(recv)]).to(t.dtype)
        if isinstance(orig, torch.Tensor):
            out.append(full.to(orig.device))
        else:
            out.append(full.cpu().numpy())
    return tuple(out)


def gather_and_evaluate(
    labels, probs, groups: Optional[Sequence] = None
) -> dict[str, float]:
    """gather_across_ranks then evaluate: every rank gets the metrics of the whole split."""
    if groups is None:
        labels, probs = gather_across_ranks(labels, probs)
        return evaluate(_flat(labels), _flat(probs))
    labels, probs, groups = gather_across_ranks(labels, probs, groups)
    return evaluate(_flat(labels), _flat(probs), _flat(groups))
