"""Training losses (spec section 5), pure torch.

Every loss takes logits, labels in {0, 1} and a (B,) `valid` weight (1 = real sample, 0 = padding
that only keeps ranks in lock-step) and averages over the valid samples of the local batch.
Logits may be (B, 1) or (B,). Per-sample BCE always comes from the stable
binary_cross_entropy_with_logits, so no log(sigmoid) of a saturated probability is ever taken.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum(valid*values) / sum(valid) over (B,) tensors; 0 (not NaN) when nothing is valid."""
    values = values.reshape(-1)
    w = valid.reshape(-1).to(values.dtype)
    # where(), not values*w: a padded sample may carry inf/NaN and 0*inf is NaN.
    total = torch.where(w > 0, values * w, torch.zeros_like(values)).sum()
    return total / w.sum().clamp_min(1e-12)


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE from logits: (B,) or (B, 1) -> (B,)."""
    logits = logits.reshape(-1)
    return F.binary_cross_entropy_with_logits(
        logits, labels.reshape(-1).to(logits.dtype), reduction="none"
    )


def _pt(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Probability given to the true class, pt = y*p + (1-y)*(1-p): (B,)."""
    logits = logits.reshape(-1)
    y = labels.reshape(-1).to(logits.dtype)
    p = torch.sigmoid(logits)
    return y * p + (1.0 - y) * (1.0 - p)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean BCE over valid samples (scalar)."""
    return masked_mean(_bce(logits, labels), valid)


def twin_focus_loss(
    z_s: torch.Tensor,
    z_c: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    c: float,
    gamma: float,
    m: Optional[float] = None,
) -> torch.Tensor:
    """L_TF = alpha*mean(BCE_s*(c + pt_s)^gamma) + (1-alpha)*mean(BCE_c*(m - pt_c)^gamma).

    z_s, z_c: (B, 1) or (B,) logits of the simple / complex heads; m defaults to 2 - c.
    The modulating factors are deliberately not detached (gradient flows through pt).
    The simple branch is up-weighted on easy samples (pt near 1), the complex one on hard ones.
    """
    if m is None:
        m = 2.0 - c
    simple = _bce(z_s, labels) * (c + _pt(z_s, labels)) ** gamma
    complex_ = _bce(z_c, labels) * (m - _pt(z_c, labels)) ** gamma
    return alpha * masked_mean(simple, valid) + (1.0 - alpha) * masked_mean(complex_, valid)


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): mean of -alpha_t*(1-pt)^gamma*log(pt) over valid samples.

    alpha_t = alpha for positives and 1-alpha for negatives; alpha=None means no class weight.
    """
    per = _bce(logits, labels) * (1.0 - _pt(logits, labels)) ** gamma  # BCE = -log(pt)
    if alpha is not None:
        y = labels.reshape(-1).to(per.dtype)
        per = per * (alpha * y + (1.0 - alpha) * (1.0 - y))
    return masked_mean(per, valid)


def reweighted_ce_loss(
    logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, beta: float = 0.25
) -> torch.Tensor:
    """R-CE, the reweighted cross-entropy of Wang et al. 2021 ("Denoising Implicit Feedback for
    Recommendation"), the R-CE that TF4CTR's paper compares against.

    Each sample's BCE is weighted by the model's own probability of its label raised to beta,
    pred^beta for a positive and (1 - pred)^beta for a negative (= pt^beta), so samples the model
    finds implausible (likely noisy) count less. The weight is detached: it scales the gradient,
    it is not differentiated. Mean over the valid samples; beta = 0 is plain BCE.
    """
    weight = _pt(logits, labels).detach() ** beta
    return masked_mean(_bce(logits, labels) * weight, valid)


class TCELoss:
    """T-CE, the truncated cross-entropy of Wang et al. 2021 ("Denoising Implicit Feedback").

    At step t the floor(rate(t) * n_valid)
    valid samples with the largest BCE are dropped and the rest averaged, with
    rate(t) = min(t * max_rate / num_gradual, max_rate).
    """

    def __init__(self, max_rate: float = 0.2, num_gradual: int = 30000) -> None:
        if not 0.0 <= max_rate < 1.0:
            raise ValueError(f"max_rate must be in [0, 1), got {max_rate}")
        if num_gradual <= 0:
            raise ValueError(f"num_gradual must be positive, got {num_gradual}")
        self.max_rate = max_rate
        self.num_gradual = num_gradual

    def drop_rate(self, step: int) -> float:
        return min(step * self.max_rate / self.num_gradual, self.max_rate)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, step: int
    ) -> torch.Tensor:
        per = _bce(logits, labels)
        w = valid.reshape(-1).to(per.dtype)
        n_valid = int((w > 0).sum())
        # The epsilon keeps e.g. 0.3 * 10 = 3.0000000000000004 -> 3 from rounding the wrong way.
        n_drop = int(math.floor(self.drop_rate(step) * n_valid + 1e-9))
        if n_drop > 0:
            # Padding gets -inf so it is never among the dropped; selection needs no gradient.
            ranked = per.detach().masked_fill(w <= 0, float("-inf"))
            drop = torch.topk(ranked, n_drop).indices
            w = w.index_fill(0, drop, 0.0)
        return masked_mean(per, w)
