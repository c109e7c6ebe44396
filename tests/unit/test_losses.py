"""Losses against hand-computed values (spec section 5)."""

from __future__ import annotations

import math

import pytest
import torch

from tf4ctr_dist.losses import TCELoss, bce_loss, focal_loss, masked_mean, twin_focus_loss


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def tf_terms(z_s, z_c, y, c, gamma, m):
    """Per-sample (L_s, dL_s/dz_s, L_c, dL_c/dz_c) written out by hand for y = 1 or y = 0.

    y = 1: pt = p,     BCE = -log p,     dBCE/dz = p - 1, dpt/dz =  p(1-p)
    y = 0: pt = 1 - p, BCE = -log(1-p),  dBCE/dz = p,     dpt/dz = -p(1-p)
    L_s = BCE_s * (c + pt_s)^gamma,  L_c = BCE_c * (m - pt_c)^gamma
    dL/dz = dBCE/dz * factor + BCE * d(factor)/dz   (factor not detached)
    """
    p_s, p_c = sigmoid(z_s), sigmoid(z_c)
    if y == 1:
        bce_s, pt_s, dbce_s, dpt_s = -math.log(p_s), p_s, p_s - 1.0, p_s * (1 - p_s)
        bce_c, pt_c, dbce_c, dpt_c = -math.log(p_c), p_c, p_c - 1.0, p_c * (1 - p_c)
    else:
        bce_s, pt_s, dbce_s, dpt_s = -math.log(1 - p_s), 1 - p_s, p_s, -p_s * (1 - p_s)
        bce_c, pt_c, dbce_c, dpt_c = -math.log(1 - p_c), 1 - p_c, p_c, -p_c * (1 - p_c)
    l_s = bce_s * (c + pt_s) ** gamma
    g_s = dbce_s * (c + pt_s) ** gamma + bce_s * gamma * (c + pt_s) ** (gamma - 1) * dpt_s
    l_c = bce_c * (m - pt_c) ** gamma
    g_c = dbce_c * (m - pt_c) ** gamma + bce_c * gamma * (m - pt_c) ** (gamma - 1) * (-dpt_c)
    return l_s, g_s, l_c, g_c


def run_tf(z_s, z_c, y, valid=None, **kw):
    zs = torch.tensor(z_s, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    zc = torch.tensor(z_c, dtype=torch.float64).reshape(-1, 1).requires_grad_()
    labels = torch.tensor(y, dtype=torch.float64)
    valid = torch.ones(len(y)) if valid is None else torch.tensor(valid, dtype=torch.float64)
    loss = twin_focus_loss(zs, zc, labels, valid, **kw)
    loss.backward()
    return loss.item(), zs.grad.reshape(-1).tolist(), zc.grad.reshape(-1).tolist()


def test_tf_single_sample_plain_numbers():
    # z = 0 -> p = 0.5, BCE = ln 2, pt = 0.5; c = 0.5, m = 1.5, gamma = 1, alpha = 0.25.
    # L_s = ln2 * 1.0, L_c = ln2 * 1.0, L = ln2.
    # dL_s/dz = -0.5 * 1 + ln2 * 0.25 ; dL_c/dz = -0.5 * 1 - ln2 * 0.25.
    loss, gs, gc = run_tf([0.0], [0.0], [1.0], alpha=0.25, c=0.5, gamma=1.0)
    ln2 = math.log(2.0)
    assert loss == pytest.approx(ln2)
    assert gs[0] == pytest.approx(0.25 * (-0.5 + 0.25 * ln2))
    assert gc[0] == pytest.approx(0.75 * (-0.5 - 0.25 * ln2))


@pytest.mark.parametrize("y", [1, 0])
def test_tf_value_and_grad_per_label(y):
    alpha, c, gamma = 0.25, 0.7, 2.0
    z_s, z_c = 1.3, -0.4
    l_s, g_s, l_c, g_c = tf_terms(z_s, z_c, y, c, gamma, 2.0 - c)
    loss, gs, gc = run_tf([z_s], [z_c], [float(y)], alpha=alpha, c=c, gamma=gamma)
    assert loss == pytest.approx(alpha * l_s + (1 - alpha) * l_c, rel=1e-12)
    assert gs[0] == pytest.approx(alpha * g_s, rel=1e-12)
    assert gc[0] == pytest.approx((1 - alpha) * g_c, rel=1e-12)


def test_tf_mixed_batch_and_valid_mask():
    alpha, c, gamma = 0.35, 0.9, 1.5
    z_s = [2.0, -1.0, 0.3, 0.7, 5.0]
    z_c = [-0.5, 1.5, -2.0, 0.1, 9.0]
    y = [1, 0, 1, 0, 0]
    valid = [1, 1, 1, 1, 0]  # the last sample is padding with a huge loss
    terms = [tf_terms(a, b, t, c, gamma, 2.0 - c) for a, b, t in zip(z_s, z_c, y)]
    n = 4
    exp_loss = sum(alpha * t[0] + (1 - alpha) * t[2] for t in terms[:n]) / n
    loss, gs, gc = run_tf(z_s, z_c, [float(t) for t in y], valid, alpha=alpha, c=c, gamma=gamma)
    assert loss == pytest.approx(exp_loss, rel=1e-12)
    for i in range(n):
        assert gs[i] == pytest.approx(alpha * terms[i][1] / n, rel=1e-12)
        assert gc[i] == pytest.approx((1 - alpha) * terms[i][3] / n, rel=1e-12)
    assert gs[4] == 0.0 and gc[4] == 0.0


def test_tf_m_override():
    alpha, c, gamma, m = 0.25, 0.7, 2.0, 1.8
    l_s, g_s, l_c, g_c = tf_terms(0.4, -0.6, 1, c, gamma, m)
    loss, gs, gc = run_tf([0.4], [-0.6], [1.0], alpha=alpha, c=c, gamma=gamma, m=m)
    assert loss == pytest.approx(alpha * l_s + (1 - alpha) * l_c, rel=1e-12)
    assert gc[0] == pytest.approx((1 - alpha) * g_c, rel=1e-12)
    default, _, _ = run_tf([0.4], [-0.6], [1.0], alpha=alpha, c=c, gamma=gamma)
    assert loss != pytest.approx(default)


def test_tf_gamma_zero_is_weighted_bce():
    torch.manual_seed(0)
    z_s, z_c = torch.randn(20, 1), torch.randn(20, 1)
    y = (torch.rand(20) < 0.5).float()
    valid = torch.ones(20)
    loss = twin_focus_loss(z_s, z_c, y, valid, alpha=0.3, c=0.8, gamma=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = 0.3 * bce(z_s.reshape(-1), y) + 0.7 * bce(z_c.reshape(-1), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_tf_modulating_factor_not_detached():
    alpha, c, gamma = 0.25, 0.7, 2.0
    z_s = torch.tensor([0.8, -0.3], requires_grad=True)
    z_c = torch.tensor([-0.2, 1.1], requires_grad=True)
    y = torch.tensor([1.0, 0.0])
    twin_focus_loss(z_s, z_c, y, torch.ones(2), alpha, c, gamma).backward()

    # Same loss with the factors detached: must give a different gradient.
    zs2, zc2 = z_s.detach().clone().requires_grad_(), z_c.detach().clone().requires_grad_()
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pt = lambda z: y * torch.sigmoid(z) + (1 - y) * (1 - torch.sigmoid(z))  # noqa: E731
    detached = alpha * (bce(zs2, y, reduction="none") * (c + pt(zs2)).detach() ** gamma).mean()
    detached = detached + (1 - alpha) * (
        bce(zc2, y, reduction="none") * (2 - c - pt(zc2)).detach() ** gamma
    ).mean()
    detached.backward()
    assert not torch.allclose(z_s.grad, zs2.grad)
    assert not torch.allclose(z_c.grad, zc2.grad)


def test_tf_stable_for_extreme_logits():
    z = torch.tensor([[80.0], [-80.0]], requires_grad=True)
    y = torch.tensor([0.0, 1.0])  # maximally wrong
    loss = twin_focus_loss(z, z, y, torch.ones(2), 0.25, 0.7, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 50
    assert torch.isfinite(z.grad).all()


def test_masked_mean_and_bce_no_valid_sample():
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0
    assert masked_mean(torch.tensor([1.0, float("inf")]), torch.tensor([1, 0])).item() == 1.0
    z = torch.tensor([[1.0], [2.0]], requires_grad=True)
    loss = bce_loss(z, torch.tensor([1.0, 0.0]), torch.zeros(2))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_bce_loss_masked_value():
    z = torch.tensor([0.5, -1.0, 3.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    # Only the first two count: (log(1+e^-0.5) + log(1+e^-1)) / 2.
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(-1.0))) / 2
    assert bce_loss(z, y, torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(expected)


def test_focal_loss():
    z = torch.tensor([0.5, -1.0, 2.0])
    y = torch.tensor([1.0, 0.0, 0.0])
    valid = torch.ones(3)
    assert focal_loss(z, y, valid, gamma=0.0).item() == pytest.approx(bce_loss(z, y, valid).item())
    # -alpha_t (1 - pt)^2 log pt, by hand.
    expected = 0.0
    for zi, yi in zip([0.5, -1.0, 2.0], [1, 0, 0]):
        p = sigmoid(zi)
        pt = p if yi else 1 - p
        expected += -(0.25 if yi else 0.75) * (1 - pt) ** 2 * math.log(pt)
    assert focal_loss(z, y, valid, gamma=2.0, alpha=0.25).item() == pytest.approx(expected / 3)


def test_tce_drop_rate_schedule():
    rce = TCELoss(max_rate=0.2, num_gradual=100)
    assert rce.drop_rate(0) == 0.0
    assert rce.drop_rate(50) == pytest.approx(0.1)
    assert rce.drop_rate(100) == pytest.approx(0.2)
    assert rce.drop_rate(10_000) == pytest.approx(0.2)


def test_tce_drops_largest_valid_losses():
    rce = TCELoss(max_rate=0.2, num_gradual=10)
    z = torch.tensor([0.1, 0.2, -3.0, 0.4, 0.5, 4.0, 0.7, 0.8, 0.9, 1.0, 50.0, 60.0])
    y = torch.zeros(12)
    valid = torch.tensor([1.0] * 10 + [0.0, 0.0])  # padding has the largest losses
    per = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")
    # step 10 -> rate 0.2 -> drop 2 of the 10 valid: z = 4.0 and 1.0 (largest logits, y = 0).
    keep = [0, 1, 2, 3, 4, 6, 7, 8]
    assert rce(z, y, valid, step=10).item() == pytest.approx(per[keep].mean().item())
    # step 0 -> no drop: plain masked BCE.
    assert rce(z, y, valid, step=0).item() == pytest.approx(per[:10].mean().item())
