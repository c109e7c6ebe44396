"""SSEM: split the field embeddings h into an "easy" and a "hard" view (spec section 2).

Every variant maps h (B, D) with D = F*d to (h_es, h_hs), both (B, D). The `ser` variant has no
dense module: it uses two separate embedding table sets and is handled by the TF4CTR model.
"""

from __future__ import annotations

import torch
from torch import nn

from tf4ctr_dist.modules.init import init_linear
from tf4ctr_dist.modules.mlp import MLPEncoder


class ShareSSEM(nn.Module):
    """`share`: both encoders see the same h. No parameters."""

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h, h


class GateSSEM(nn.Module):
    """`gm`: one scalar gate per sample, g = sigmoid(MLP D -> D/4 -> 1)(h).

    h (B, D) -> h_es = g*h, h_hs = (1-g)*h, both (B, D).
    """

    def __init__(self, in_dim: int, dropout: float) -> None:
        super().__init__()
        hidden = in_dim // 4
        if hidden < 1:
            raise ValueError(f"GateSSEM needs in_dim >= 4, got {in_dim}")
        self.gate = nn.Sequential(
            MLPEncoder(in_dim, [hidden], dropout, batch_norm=True),
            init_linear(nn.Linear(hidden, 1)),
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.sigmoid(self.gate(h))  # (B, 1), broadcasts over the D columns
        return g * h, (1.0 - g) * h


class MoESSEM(nn.Module):
    """`moe`: two experts shared by two softmax gates, one gate per output view.

    Expert k: MLP D -> D/2 -> D (BN, ReLU, dropout after both layers).
    Gate j:   softmax(MLP D -> D/4 -> 2). Choice: the gate's hidden layer is a full
              Linear -> BN -> ReLU -> Dropout block (like the experts), then a plain Linear to 2
              logits; the spec only fixes the layer widths.
    h (B, D) -> h_es = sum_k gate_es_k * expert_k(h), h_hs = sum_k gate_hs_k * expert_k(h).
    """

    num_experts = 2

    def __init__(self, in_dim: int, dropout: float) -> None:
        super().__init__()
        if in_dim < 4:
            raise ValueError(f"MoESSEM needs in_dim >= 4, got {in_dim}")
        self.experts = nn.ModuleList(
            MLPEncoder(in_dim, [in_dim // 2, in_dim], dropout, batch_norm=True)
            for _ in range(self.num_experts)
        )
        self.gate_es = self._gate(in_dim, dropout)
        self.gate_hs = self._gate(in_dim, dropout)

    def _gate(self, in_dim: int, dropout: float) -> nn.Module:
        hidden = in_dim // 4
        return nn.Sequential(
            MLPEncoder(in_dim, [hidden], dropout, batch_norm=True),
            init_linear(nn.Linear(hidden, self.num_experts)),
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        experts = torch.stack([e(h) for e in self.experts], dim=1)  # (B, K, D)
        g_es = torch.softmax(self.gate_es(h), dim=-1).unsqueeze(-1)  # (B, K, 1)
        g_hs = torch.softmax(self.gate_hs(h), dim=-1).unsqueeze(-1)  # (B, K, 1)
        return (g_es * experts).sum(dim=1), (g_hs * experts).sum(dim=1)  # (B, D) each
