"""clip_gradients (the dense step's clipping) equals torch.nn.utils.clip_grad_norm_ exactly, also
where it skips the multiply by 1.0."""

from __future__ import annotations

import math

import pytest
import torch

from tf4ctr_dist.distributed.sharding import clip_gradients


def _params(scale: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 7), (7,), (3, 3, 3)]]
    for p in params:
        p.grad = torch.randn_like(p) * scale
    params.append(torch.nn.Parameter(torch.randn(5)))  # no gradient: ignored
    return params


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_equals_torch_clip_grad_norm(scale):
    ours, theirs = _params(scale), _params(scale)
    total = clip_gradients(ours, 10.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    assert torch.equal(total, expected)
    for a, b in zip(ours[:3], theirs[:3]):
        assert torch.equal(a.grad, b.grad)
    norm = math.sqrt(sum(float(g.grad.double().square().sum()) for g in ours[:3]))
    assert norm == pytest.approx(min(float(total), 10.0), rel=1e-5)  # clipped to 10 where it was larger


def test_non_finite_norm_still_scales_like_torch():
    ours, theirs = _params(1.0), _params(1.0)
    ours[0].grad[0, 0] = theirs[0].grad[0, 0] = float("inf")
    clip_gradients(ours, 10.0)
    torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    for a, b in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)
    assert ours[1].grad.eq(0).all()  # scaled by 10 / inf


def test_no_gradients():
    assert float(clip_gradients([torch.nn.Parameter(torch.ones(2))], 1.0)) == 0.0
