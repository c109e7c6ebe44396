"""SSEM / DFM / MLP building blocks: shapes, formulas, parameter counts (spec sections 2-4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tf4ctr_dist.modules import (
    ConcatFusion,
    GateSSEM,
    MLPEncoder,
    MoEFusion,
    MoESSEM,
    ShareSSEM,
    SumFusion,
    VariationalFusion,
    WeightedSumFusion,
)

B, D = 6, 40  # D plays F*d


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def mlp_params(in_dim, units, bn=True):
    """Linear (in*out + out) plus BN (2*out) per hidden layer."""
    total, prev = 0, in_dim
    for u in units:
        total += prev * u + u + (2 * u if bn else 0)
        prev = u
    return total


def test_mlp_layout_init_and_params():
    mlp = MLPEncoder(D, [32, 16], dropout=0.2)
    kinds = [type(m) for m in mlp.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2
    assert mlp.out_dim == 16
    assert n_params(mlp) == mlp_params(D, [32, 16])
    assert n_params(MLPEncoder(D, [32, 16], 0.0, batch_norm=False)) == mlp_params(D, [32, 16], False)
    assert mlp(torch.randn(B, D)).shape == (B, 16)
    for lin in (m for m in mlp.modules() if isinstance(m, nn.Linear)):
        assert torch.count_nonzero(lin.bias) == 0


def test_xavier_normal_std():
    torch.manual_seed(0)
    lin = MLPEncoder(400, [600], 0.0).net[0]
    expected = (2.0 / (400 + 600)) ** 0.5
    assert lin.weight.std().item() == pytest.approx(expected, rel=0.03)


def test_share_ssem():
    h = torch.randn(B, D)
    h_es, h_hs = ShareSSEM()(h)
    assert h_es is h and h_hs is h
    assert n_params(ShareSSEM()) == 0


def test_gate_ssem():
    ssem = GateSSEM(D, dropout=0.1).eval()
    q = D // 4
    assert n_params(ssem) == (D * q + q) + 2 * q + (q + 1)
    h = torch.randn(B, D)
    h_es, h_hs = ssem(h)
    assert h_es.shape == h_hs.shape == (B, D)
    torch.testing.assert_close(h_es + h_hs, h)
    g = h_es / h  # one scalar per row
    assert torch.allclose(g, g[:, :1].expand_as(g), atol=1e-5)
    assert ((g > 0) & (g < 1)).all()


def test_moe_ssem():
    ssem = MoESSEM(D, dropout=0.1).eval()
    half, q = D // 2, D // 4
    expert = (D * half + half) + 2 * half + (half * D + D) + 2 * D
    gate = (D * q + q) + 2 * q + (q * 2 + 2)
    assert n_params(ssem) == 2 * expert + 2 * gate
    h = torch.randn(B, D)
    h_es, h_hs = ssem(h)
    assert h_es.shape == h_hs.shape == (B, D)
    # Each output is the gate-weighted mix of the two experts.
    e0, e1 = ssem.experts[0](h), ssem.experts[1](h)
    g = torch.softmax(ssem.gate_es(h), dim=-1)
    torch.testing.assert_close(h_es, g[:, :1] * e0 + g[:, 1:] * e1)
    g = torch.softmax(ssem.gate_hs(h), dim=-1)
    torch.testing.assert_close(h_hs, g[:, :1] * e0 + g[:, 1:] * e1)


S_DIM, C_DIM = 12, 20


def fusion_inputs():
    torch.manual_seed(1)
    return torch.randn(B, 1), torch.randn(B, 1), torch.randn(B, S_DIM), torch.randn(B, C_DIM)


@pytest.mark.parametrize(
    "make, expected_params",
    [
        (lambda: SumFusion(), 0),
        (lambda: WeightedSumFusion(), 2),
        (lambda: VariationalFusion(S_DIM, C_DIM), (S_DIM + 1) + (C_DIM + 1)),
        (lambda: ConcatFusion(S_DIM, C_DIM), S_DIM + C_DIM + 1),
        (lambda: MoEFusion(S_DIM, C_DIM), 2 * ((S_DIM + C_DIM) * 2 + 2)),
    ],
)
def test_fusion_shapes_and_params(make, expected_params):
    fusion = make()
    assert n_params(fusion) == expected_params
    for mode in (True, False):
        fusion.train(mode)
        assert fusion(*fusion_inputs()).shape == (B, 1)


def test_fusion_formulas():
    z_s, z_c, v_s, v_c = fusion_inputs()
    torch.testing.assert_close(SumFusion()(z_s, z_c, v_s, v_c), z_s + z_c)
    wsf = WeightedSumFusion()
    assert wsf.w_s.item() == 0.5 and wsf.w_c.item() == 0.5
    torch.testing.assert_close(wsf(z_s, z_c, v_s, v_c), 0.5 * z_s + 0.5 * z_c)
    cf = ConcatFusion(S_DIM, C_DIM)
    torch.testing.assert_close(cf(z_s, z_c, v_s, v_c), cf.out(torch.cat([v_s, v_c], 1)))
    moef = MoEFusion(S_DIM, C_DIM)
    v = torch.cat([v_s, v_c], 1)
    g, m = torch.softmax(moef.gate(v), -1), moef.experts(v)
    torch.testing.assert_close(moef(z_s, z_c, v_s, v_c), g[:, :1] * m[:, :1] + g[:, 1:] * m[:, 1:])


def test_vf_deterministic_in_eval_stochastic_in_train():
    vf = VariationalFusion(S_DIM, C_DIM, tau=0.8)
    inputs = fusion_inputs()
    z_s, z_c, v_s, v_c = inputs
    vf.eval()
    first, second = vf(*inputs), vf(*inputs)
    torch.testing.assert_close(first, second)
    p = torch.softmax(torch.cat([vf.score_s(v_s), vf.score_c(v_c)], 1) / 0.8, dim=-1)
    torch.testing.assert_close(first, p[:, :1] * z_s + p[:, 1:] * z_c)
    vf.train()
    torch.manual_seed(0)
    a = vf(*inputs)
    b = vf(*inputs)
    assert not torch.allclose(a, b)
    # Still a convex mix of z_s and z_c.
    lo, hi = torch.minimum(z_s, z_c), torch.maximum(z_s, z_c)
    assert ((a >= lo - 1e-6) & (a <= hi + 1e-6)).all()
