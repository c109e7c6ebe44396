"""DFM: fuse the simple and complex logits into the final logit z (spec section 4).

Every variant: forward(z_s, z_c, v_s, v_c) -> z (B, 1), with z_s, z_c (B, 1) logits and
v_s (B, s_dim), v_c (B, c_dim) the encoder output vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tf4ctr_dist.modules.init import init_linear


class SumFusion(nn.Module):
    """`sum`: z = z_s + z_c."""

    def forward(self, z_s, z_c, v_s, v_c) -> torch.Tensor:
        return z_s + z_c


class WeightedSumFusion(nn.Module):
    """`wsf`: z = w1*z_s + w2*z_c, w1 = w2 = 0.5 at init, learnable and unconstrained."""

    def __init__(self) -> None:
        super().__init__()
        self.w_s = nn.Parameter(torch.empty(()))
        self.w_c = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.w_s.fill_(0.5)
        self.w_c.fill_(0.5)

    def forward(self, z_s, z_c, v_s, v_c) -> torch.Tensor:
        return self.w_s * z_s + self.w_c * z_c


class VariationalFusion(nn.Module):
    """`vf`: p = gumbel_softmax([Linear(v_s), Linear(v_c)], tau); z = p_s*z_s + p_c*z_c.

    Deliberate deviation from the authors: Gumbel noise only in training; eval uses the
    deterministic softmax(pi / tau) so valid/test predictions are reproducible. Note that an fx
    trace records the branch of the mode the module was in when traced.
    """

    def __init__(self, s_dim: int, c_dim: int, tau: float = 0.8) -> None:
        super().__init__()
        self.score_s = init_linear(nn.Linear(s_dim, 1))
        self.score_c = init_linear(nn.Linear(c_dim, 1))
        self.tau = tau

    def forward(self, z_s, z_c, v_s, v_c) -> torch.Tensor:
        pi = torch.cat([self.score_s(v_s), self.score_c(v_c)], dim=1)  # (B, 2)
        if self.training:
            p = F.gumbel_softmax(pi, tau=self.tau, hard=False, dim=-1)
        else:
            p = torch.softmax(pi / self.tau, dim=-1)
        return p[:, 0:1] * z_s + p[:, 1:2] * z_c


class ConcatFusion(nn.Module):
    """`cf`: z = Linear(concat(v_s, v_c) -> 1); z_s and z_c still feed the TF loss."""

    def __init__(self, s_dim: int, c_dim: int) -> None:
        super().__init__()
        self.out = init_linear(nn.Linear(s_dim + c_dim, 1))

    def forward(self, z_s, z_c, v_s, v_c) -> torch.Tensor:
        return self.out(torch.cat([v_s, v_c], dim=1))  # (B, s_dim + c_dim) -> (B, 1)


class MoEFusion(nn.Module):
    """`moef`: g = softmax(Linear(concat -> 2)), m = Linear(concat -> 2), z = sum_k g_k*m_k."""

    def __init__(self, s_dim: int, c_dim: int) -> None:
        super().__init__()
        self.gate = init_linear(nn.Linear(s_dim + c_dim, 2))
        self.experts = init_linear(nn.Linear(s_dim + c_dim, 2))

    def forward(self, z_s, z_c, v_s, v_c) -> torch.Tensor:
        v = torch.cat([v_s, v_c], dim=1)  # (B, s_dim + c_dim)
        g = torch.softmax(self.gate(v), dim=-1)  # (B, 2)
        return (g * self.experts(v)).sum(dim=1, keepdim=True)  # (B, 1)
